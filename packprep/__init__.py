"""packprep: pack tokenized documents into fixed-length rows for LLM training, without attending across documents.

    from packprep import pack          # numba bin-packing engine over a length array
    plan = pack(lengths, seq_len=4096, strategy="ffd")
"""

__version__ = "0.1.0"

__all__ = ["__version__", "pack", "build"]


def __getattr__(name):  # lazy: `import packprep` stays cheap (no numba / transformers import)
    if name == "pack":
        from packprep.pack import pack

        return pack
    if name == "build":
        from packprep.build import build

        return build
    raise AttributeError(f"module 'packprep' has no attribute {name!r}")
