"""megatier: low-latency LLM inference with megakernel decode and a KV cache across HBM, DRAM and disk."""

from megatier.errors import MegatierError

__version__ = "0.1.0"
__all__ = ["LLM", "MegatierError", "RequestOutput", "SamplingParams", "StructuredOutput"]


def __getattr__(name: str):
    # Import the engine lazily so `import megatier` stays cheap for tools that only need a submodule.
    if name == "LLM":
        from megatier.llm import LLM

        return LLM
    if name == "RequestOutput":
        from megatier.engine import RequestOutput

        return RequestOutput
    if name == "SamplingParams":
        from megatier.sampling import SamplingParams

        return SamplingParams
    if name == "StructuredOutput":
        from megatier.structured import StructuredOutput

        return StructuredOutput
    raise AttributeError(name)
