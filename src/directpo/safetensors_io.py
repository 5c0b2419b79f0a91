"""safetensors files at the byte level: reading a file's header, a local checkpoint's weight map,
rows of one tensor straight into a buffer, and writing a file one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {...}} (padded with spaces to a multiple of 8 when written), then
the data (row-major; offsets from the data's start), tensors in safetensors' own order (`data_order`).

    read_header(path) -> (where the data starts, the header)
    weight_map(directory, name) -> {tensor name: file} of a sharded or single-file checkpoint
    read_rows(path, key, rows, out) -> rows [start, stop) of a tensor read into `out` (FSDP's shards)
    SafetensorsStream(entries) -> a file written header first, then tensor by tensor (`training.export`)

Where a checkpoint comes from (the hub's download) is `models.safetensors_index`'s concern.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

from .errors import UserValueError

# safetensors' dtype names, in the order its serializer sorts a file's data (largest first, then by
# name): the Rust crate's `Dtype` enum order, descending.
SAFETENSORS_DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
                      torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------
# Reading


def read_header(path: str) -> tuple[int, dict]:
    """(where the data starts, the JSON header {name: {dtype, shape, data_offsets}, ...}) of a
    safetensors file: an 8-byte little-endian header length, then the header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def weight_map(path: str, name: str | None = None) -> dict[str, str]:
    """{tensor name: the safetensors file holding it} of the checkpoint in local directory `path`:
    sharded (`model.safetensors.index.json`) or a single `model.safetensors`. `name`: what the user
    called it, for the message when neither is there."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{name or path}: no model.safetensors or model.safetensors.index.json; directpo "
                                "loads only safetensors (pickled .bin checkpoints can run code). Convert it with "
                                "`save_pretrained` first")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # weights read as rows


def read_rows(path: str, key: str, rows: tuple[int, int], out: torch.Tensor, headers: dict | None = None) -> bool:
    """Rows [start, stop) of tensor `key` of safetensors file `path` read with plain file reads
    into `out` (a contiguous CPU tensor of those rows in the file's dtype); False (nothing read)
    when that does not hold. `headers` caches the files' headers (`read_header`) for one load."""
    if out.device.type != "cpu" or not out.is_contiguous() or out.dtype not in ROW_DTYPES:
        return False
    headers = {} if headers is None else headers
    if path not in headers:
        headers[path] = read_header(path)
    data_start, header = headers[path]
    entry = header.get(key)
    if entry is None or entry["dtype"] != SAFETENSORS_DTYPES[out.dtype] or not entry["shape"] or \
            tuple(out.shape) != (rows[1] - rows[0], *entry["shape"][1:]):
        return False
    row_bytes = out[0].numel() * out.element_size() if len(out) else 0
    begin = data_start + entry["data_offsets"][0] + rows[0] * row_bytes
    flat = out.reshape(-1).view(torch.uint8)  # the shard's own bytes (contiguous: no copy)
    with open(path, "rb") as f:
        f.seek(begin)
        got = f.readinto(flat.numpy()) if flat.numel() else 0
    if got != flat.numel():
        raise UserValueError(f"{path}: {key} ends before its rows {rows[0]}-{rows[1]} (a truncated file)")
    return True


# ----------------------------------------------------------------------------------------------
# Writing


_DTYPE_RANK = {dt: i for i, dt in enumerate(SAFETENSORS_DTYPES)}  # safetensors' data order


def data_order(name: str, dtype: torch.dtype) -> tuple[int, str]:
    """The sort key of a tensor in a safetensors file: its dtype's rank (largest first), then its name."""
    if dtype not in _DTYPE_RANK:
        raise ValueError(f"{name}: dtype {dtype} has no safetensors name here")
    return _DTYPE_RANK[dtype], name


class SafetensorsStream:
    """A safetensors file written one tensor at a time: the header (names, dtypes, shapes, offsets,
    {"format": "pt"}) first, then each tensor's bytes as it comes, in the order given, which must be
    safetensors' own (`data_order`) for the file to equal `safetensors.torch.save_file`'s. The
    format: an 8-byte little-endian header length, the JSON header padded with spaces to a multiple
    of 8, the data."""

    def __init__(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            data_order(name, dtype)  # a dtype safetensors cannot name is refused here
            size = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        self.header = text + b" " * (-len(text) % 8)
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self.done = 0
        self.file = None

    def open(self, path):
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(self.header)) + self.header)
        return self.close

    def append(self, t: torch.Tensor) -> None:
        name, dtype, shape = self.expected[self.done]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self.file.write(memoryview(flat.view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        try:
            if self.done != len(self.expected):
                raise RuntimeError(f"{len(self.expected) - self.done} tensors of the file were never written")
        finally:
            self.file.close()
