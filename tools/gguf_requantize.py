"""Rewrite a GGUF with its weights in another llama.cpp type, metadata kept: the peer files of the
benchmarks (e.g. llama.cpp on a Q8_0 SmolLM2 when the package ships Q4_1 only).

    python tools/gguf_requantize.py SOURCE.gguf OUT.gguf [--type Q8_0|F16|F32]

Every weight matrix (2-D or more, rows a multiple of the type's block) is dequantized with the
`gguf` package (gguf-py, llama.cpp's own Python library) and quantized again to --type with
gguf.quants.quantize, which is bit-exact with ggml-quants.c's reference quantizers; a tensor already
of that type is copied byte for byte. 1-D tensors (norms, biases) stay F32, as llama.cpp's quantize
keeps them. All metadata (hyperparameters, tokenizer, chat template) is copied unchanged except
general.file_type, which names the new type. This is what llama.cpp's `llama-quantize --pure
--allow-requantize` does; llama-cpp-python ships neither that binary nor convert_hf_to_gguf.py,
only the library, so this uses gguf-py. Requantizing loses precision on top of the source's:
a Q8_0 made from a Q4_1 holds the Q4_1 values to within Q8_0's rounding (|error| <= max|block| / 254).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TYPES = ("Q8_0", "F16", "F32")


def requantize(source: Path, out: Path, type_name: str = "Q8_0") -> dict[str, str]:
    """Write `out` with `source`'s weights in `type_name`; returns {tensor: type written}."""
    import gguf

    target = gguf.GGMLQuantizationType[type_name]
    file_type = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "F32": gguf.LlamaFileType.ALL_F32}[type_name]
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # The architecture and the GGUF.* header fields are written by GGUFWriter itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(int(file_type))

    block = gguf.GGML_QUANT_SIZES[target][0]
    written = {}
    for tensor in reader.tensors:
        row = int(tensor.shape[0])  # GGML order: shape[0] is the row length (the input features)
        if tensor.tensor_type == target:
            data, kind = tensor.data, target  # already the type: the same bytes
        elif len(tensor.shape) < 2 or tensor.n_elements == row or row % block:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            kind = gguf.GGMLQuantizationType.F32
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32 [..., row]
            data, kind = gguf.quants.quantize(values, target), target
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=kind)
        written[tensor.name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gguf_requantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the GGUF to read")
    parser.add_argument("out", type=Path, help="the GGUF to write")
    parser.add_argument("--type", default="Q8_0", choices=TYPES, help="the weights' type in OUT (default Q8_0)")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.exit(2, f"gguf_requantize: error: {args.source}: no such file\n")
    if args.out.resolve() == args.source.resolve():
        parser.exit(2, "gguf_requantize: error: OUT must differ from SOURCE (it is read while OUT is written)\n")
    try:
        written = requantize(args.source, args.out, args.type)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        args.out.unlink(missing_ok=True)
        parser.exit(2, f"gguf_requantize: error: {args.source}: not a GGUF this tool can rewrite ({e})\n")
    counts: dict[str, int] = {}
    for kind in written.values():
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB): {summary} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
