"""Rewriting a GGUF for a test: the same metadata and tensors, some re-encoded, some added."""

import numpy as np


def rewrite_gguf(src, dst, extra_kv=(), extra_tensors=(), retype=None):
    """dst: src's metadata and tensors, plus extra_kv [(key, value, GGUFValueType)] and extra_tensors
    [(name, float array)]; retype(tensor) may give (bytes, GGMLQuantizationType name) to write a tensor
    re-encoded (None keeps its bytes)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    for key, value, kind in extra_kv:
        writer.add_key_value(key, value, kind)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    for t in reader.tensors:
        new = retype(t) if retype is not None else None
        data, kind = new if new is not None else (np.ascontiguousarray(t.data), t.tensor_type.name)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
