"""Build a Hugging Face tokenizer (the `tokenizers` library) from a GGUF file's tokenizer metadata.

A GGUF file stores the vocabulary, the BPE merges and a type per token, but only *names* the
pre-tokenizer (tokenizer.ggml.pre: "smollm", "llama-bpe", ...): llama.cpp maps each name to the text
splitting rules of the model it came from. PRE_TOKENIZERS gives the names we support their Hugging Face
equivalent; any other name is refused rather than guessed, since a wrong split silently changes token ids.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from megatier.errors import MegatierError

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL = 3
USER_DEFINED = 4

# Llama 3's split: letters with one leading non-letter, numbers in runs of up to three digits,
# punctuation runs, newlines, and the remaining whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex split, then bytes mapped to printable characters."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """Every digit on its own (StarCoder, SmolLM), then GPT-2's split."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, whether a whole word found in the vocabulary skips the merges).
PRE_TOKENIZERS = {
    "default": (_gpt2, False),
    "gpt-2": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "refact": (_digits_then_gpt2, False),
    "llama3": (_llama3, True),
    "llama-v3": (_llama3, True),
    "llama-bpe": (_llama3, True),
}


def _in_vocab(pair: tuple[str, ...], vocab: dict[str, int]) -> bool:
    return all(part in vocab for part in pair) and "".join(pair) in vocab


def build_tokenizer(
    model: str,
    pre: str,
    tokens: list[str],
    token_types: list[int],
    merges: list[str],
    bos_id: int | None,
    add_bos: bool,
    source: str,
) -> Tokenizer:
    """A byte-level BPE tokenizer equivalent to llama.cpp's for these metadata values.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens, so
    text such as "<|im_start|>" maps to its single id. `source` (the GGUF path) prefixes every error.
    """
    if model != "gpt2":
        kind = "SentencePiece " if model == "llama" else ""
        raise MegatierError(
            f"{source}: unsupported {kind}tokenizer model {model!r} (tokenizer.ggml.model); "
            "only 'gpt2' byte-level BPE tokenizers are supported"
        )
    if pre not in PRE_TOKENIZERS:
        raise MegatierError(
            f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {', '.join(PRE_TOKENIZERS)}"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MegatierError(f"{source}: tokenizer.ggml.tokens lists the same token twice")
    if token_types and len(token_types) != len(tokens):
        raise MegatierError(
            f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((m for m, p in zip(merges, pairs, strict=True) if len(p) != 2 or not _in_vocab(p, vocab)), None)
    if bad is not None:
        raise MegatierError(f"{source}: tokenizer.ggml.merges has an invalid merge {bad!r}")
    make_pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types, strict=True)) if token_types else []
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED])
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer
