"""Quantized weights kept quantized: block formats (blocks.py), their CPU matmuls (cpu.py), the
`quantization` load option (schemes.py) and the GPU kernel (kernels/quant_gemm.py)."""
