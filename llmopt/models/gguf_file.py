"""A fast GGUF header reader: metadata, tensor table and memory-mapped tensor bytes.

``gguf.GGUFReader`` builds a numpy view per array element, which costs about 2 s for a 49k-token
vocabulary; this reader walks the header once with ``struct`` (about 0.1 s) and maps the tensor
data without copying. Types, block sizes and the layout come from the ``gguf`` package itself,
and a test holds this reader equal to ``gguf.GGUFReader`` on real files.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file we can read (bad magic, version, truncation, absurd header
    values such as a zero alignment, more tensors than the file can hold, data past its end)."""


MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20
# Smallest encoding of one header record, to bound counts by the bytes left before trusting them.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: ne[0] (the innermost, contiguous dimension) first
    offset: int  # absolute file offset of the data
    nbytes: int
    data: np.ndarray  # uint8 view of the raw bytes (memory-mapped)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise GGUFFormatError(f"{self.path.name} is empty, not a GGUF file") from None
        buf = self._mm
        self.size = len(buf)
        if buf[:4] != MAGIC:
            raise GGUFFormatError(f"{self.path.name} is not GGUF: bad magic {bytes(buf[:4])!r} (expected b'GGUF')")
        self._pos = 4
        try:
            self.version = self._u32()
            if self.version not in (2, 3):
                raise GGUFFormatError(f"{self.path.name}: unsupported GGUF version {self.version} (2 and 3 are read)")
            n_tensors, n_kv = self._u64(), self._u64()
            self._check_count(n_kv, _MIN_KV_BYTES, "metadata entries")
            self._check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensors")
            self.fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self._str()
                self.fields[key] = self._value(self._u32(), key)
            infos = []
            for _ in range(n_tensors):
                name = self._str()
                ndim = self._u32()
                if not 1 <= ndim <= MAX_DIMS:
                    raise GGUFFormatError(f"{self.path.name}: tensor {name!r} has {ndim} dimensions "
                                          f"(GGUF allows 1 to {MAX_DIMS}); the file is corrupt")
                shape = struct.unpack_from(f"<{ndim}q", buf, self._pos)
                self._pos += 8 * ndim
                if any(d < 0 for d in shape):
                    raise GGUFFormatError(f"{self.path.name}: tensor {name!r} has a negative dimension "
                                          f"{list(shape)}; the file is corrupt")
                qtype, off = self._u32(), self._u64()
                infos.append((name, tuple(int(s) for s in shape), qtype, off))
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            raise GGUFFormatError(f"{self.path.name}: the GGUF header is corrupt or truncated ({e})") from None
        align = self.fields.get("general.alignment", 32)
        if type(align) is not int or not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
            raise GGUFFormatError(f"{self.path.name}: general.alignment is {align!r}; it must be a power of "
                                  f"two from 1 to {MAX_ALIGNMENT} (GGUF's default is 32): the file is corrupt")
        data_start = (self._pos + align - 1) // align * align
        self.tensors: list[GGUFTensor] = []
        whole = np.frombuffer(buf, dtype=np.uint8)
        for name, shape, qtype, off in infos:
            try:
                qt = GGMLQuantizationType(qtype)
            except ValueError:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} has unknown ggml type {qtype}") from None
            block, type_bytes = GGML_QUANT_SIZES[qt]
            if shape[0] % block:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} of type {qt.name} has a row of "
                                      f"{shape[0]} values, not a multiple of its block size {block}")
            nbytes = math.prod(shape) // block * type_bytes  # exact: Python ints do not overflow
            start = data_start + off
            if off % align:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} starts at data offset {off:,}, "
                                      f"not a multiple of the alignment {align}; the file is corrupt")
            if start + nbytes > self.size:
                raise GGUFFormatError(
                    f"{self.path.name} is truncated or corrupt: tensor {name!r} needs bytes up to "
                    f"{start + nbytes:,} but the file has {self.size:,}")
            self.tensors.append(GGUFTensor(name, qt, shape, start, nbytes, whole[start:start + nbytes]))

    def _check_count(self, n: int, min_bytes: int, what: str) -> None:
        room = (self.size - self._pos) // min_bytes
        if n > room:
            raise GGUFFormatError(f"{self.path.name}: the header claims {n:,} {what} but the file has room "
                                  f"for at most {room:,}; it is truncated or corrupt")

    # ---- primitive readers ---------------------------------------------------------------------
    def _u32(self) -> int:
        v = struct.unpack_from("<I", self._mm, self._pos)[0]
        self._pos += 4
        return v

    def _u64(self) -> int:
        v = struct.unpack_from("<Q", self._mm, self._pos)[0]
        self._pos += 8
        return v

    def _str(self) -> str:
        n = self._u64()
        if self._pos + n > self.size:
            raise IndexError("string runs past the end of the file")
        s = self._mm[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int, key: str) -> Any:
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise GGUFFormatError(f"{self.path.name}: metadata {key!r} has unknown value type {vtype}; "
                                  f"the file is corrupt") from None
        if vt == GGUFValueType.STRING:
            return self._str()
        if vt == GGUFValueType.ARRAY:
            try:
                et = GGUFValueType(self._u32())
            except ValueError:
                raise GGUFFormatError(f"{self.path.name}: metadata {key!r} is an array of an unknown "
                                      f"value type; the file is corrupt") from None
            n = self._u64()
            width = 8 if et in (GGUFValueType.STRING, GGUFValueType.ARRAY) else struct.calcsize(_SCALAR[et])
            self._check_count(n, width, f"elements in metadata {key!r}")
            if et == GGUFValueType.STRING:
                return [self._str() for _ in range(n)]
            if et == GGUFValueType.ARRAY:
                return [self._value(GGUFValueType.ARRAY, key) for _ in range(n)]
            fmt = _SCALAR[et]
            arr = np.frombuffer(self._mm, dtype=np.dtype(fmt), count=n, offset=self._pos)
            self._pos += width * n
            return arr.tolist()
        fmt = _SCALAR[vt]
        v = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v
