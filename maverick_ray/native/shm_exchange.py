"""Python side of shm_exchange.c: all-to-all between the ranks of one host over shared memory.

Shape legend: W ranks; tensors are split along dim 0 into W row blocks, block w going to (or
coming from) rank w; a row's bytes are the product of the other dims times the item size.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch

from .build import load

_P, _L = ctypes.c_void_p, ctypes.c_int64
_ERRORS = {1: "timed out after {t:.0f} s waiting for rank {peer}",
           2: "rank {peer} exited during the exchange",
           3: "rank {peer} sent {n} bytes where {want} were expected (ranks disagree on split sizes)"}


class ExchangeError(RuntimeError):
    """An exchange failed; the segment's streams are out of step afterwards and it refuses more."""


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _blocks(t: torch.Tensor, splits, world: int, what: str) -> tuple[list[int], list[int]]:
    """(byte offsets, byte lengths) of the W row blocks of t."""
    rows = t.shape[0]
    if not splits:
        if rows % world:
            raise ValueError(f"{what}: {rows} rows do not split evenly over {world} ranks")
        splits = [rows // world] * world
    if len(splits) != world or any(s < 0 for s in splits) or sum(splits) != rows:
        raise ValueError(f"{what}: split sizes {list(splits)} do not cover its {rows} rows over {world} ranks")
    rb, off, offs = _row_bytes(t), 0, []
    for s in splits:
        offs.append(off * rb)
        off += s
    return offs, [s * rb for s in splits]


class SharedMemoryExchange:
    """One rank's handle on a segment the W ranks of one host share (created by `create`,
    opened by every rank with `attach`)."""

    def __init__(self, lib: ctypes.CDLL, segment: mmap.mmap, world: int, rank: int, timeout_s: float):
        self._segment, self.world, self.rank, self.timeout_s = segment, world, rank, timeout_s
        self._view = ctypes.c_char.from_buffer(segment)  # keeps the mapping exported while we use it
        self._base = ctypes.addressof(self._view)
        self.broken: str | None = None
        fn = lib.shm_exchange_all_to_all
        fn.argtypes = [_P, _L, _P, _P, _P, _P, _P, _P, ctypes.c_double, _P, _P]
        fn.restype = ctypes.c_int
        self._fn = fn

    @staticmethod
    def _layout(world: int) -> tuple[ctypes.CDLL, int, int]:
        """(the compiled library, ring bytes, segment bytes) for a W-rank segment; OSError when
        the library cannot be built here."""
        lib = load("shm_exchange")
        if lib is None:
            raise OSError("the shared-memory exchange could not be compiled")
        lib.shm_exchange_segment_bytes.argtypes = [_L, _L]
        lib.shm_exchange_segment_bytes.restype = _L
        lib.shm_exchange_init.argtypes = [_P, _L, _L, ctypes.c_uint64]
        lib.shm_exchange_init.restype = None
        lib.shm_exchange_attach.argtypes = [_P, _L, _L, ctypes.c_uint64, _L, _L, ctypes.c_uint64]
        lib.shm_exchange_attach.restype = ctypes.c_int
        ring = SharedMemoryExchange.ring_bytes(world)
        return lib, ring, lib.shm_exchange_segment_bytes(world, ring)

    @staticmethod
    def ring_bytes(world: int) -> int:
        """Bytes per ordered pair's ring: 1 MiB, less above 4 ranks (16 MiB per segment at most)."""
        return max(64 << 10, min(1 << 20, (16 << 20) // (world * world)))

    @classmethod
    def create(cls, path: str, world: int, token: int) -> None:
        """Creates the segment file at `path` (it must not exist) with its space reserved, so a
        full /dev/shm fails here with ENOSPC rather than later with SIGBUS."""
        lib, ring, size = cls._layout(world)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            with mmap.mmap(fd, size) as seg:
                view = ctypes.c_char.from_buffer(seg)
                lib.shm_exchange_init(ctypes.addressof(view), world, ring, token)
                del view
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str, world: int, rank: int, token: int, timeout_s: float) -> SharedMemoryExchange:
        """Maps the segment at `path` and registers this process as `rank`. Raises OSError if the
        file is missing or is not the segment announced with `token` (e.g. a rank on another host)."""
        lib, ring, size = cls._layout(world)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(f"{path} is not a {world}-rank exchange segment")
            seg = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        ex = cls(lib, seg, world, rank, timeout_s)
        if lib.shm_exchange_attach(ex._base, world, ring, token, rank, os.getpid(), _pid_namespace()) != 0:
            ex.close()
            raise OSError(f"{path} is not the segment this group announced")
        return ex

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None) -> None:
        """torch.distributed.all_to_all_single's contract for contiguous CPU tensors of one dtype."""
        if self.broken:
            raise ExchangeError(f"the shared-memory exchange failed earlier and cannot be used: {self.broken}")
        for t, name in ((out, "output"), (inp, "input")):
            if t.device.type != "cpu" or not t.is_contiguous() or t.dim() == 0:
                raise ValueError(f"shared-memory all-to-all needs contiguous CPU tensors of at least one dim; "
                                 f"{name} is not")
        if out.dtype != inp.dtype:
            raise ValueError(f"output dtype {out.dtype} differs from input dtype {inp.dtype}")
        send_off, send_len = _blocks(inp, in_splits, self.world, "input")
        recv_off, recv_len = _blocks(out, out_splits, self.world, "output")
        arr = _L * self.world
        bad, bad_len = _L(-1), _L(0)
        rc = self._fn(self._base, self.rank, inp.data_ptr(), arr(*send_off), arr(*send_len), out.data_ptr(),
                      arr(*recv_off), arr(*recv_len), self.timeout_s, ctypes.byref(bad), ctypes.byref(bad_len))
        if rc:
            peer = bad.value
            self.broken = _ERRORS.get(rc, "error {rc}").format(
                t=self.timeout_s, peer=peer, n=bad_len.value, want=recv_len[peer] if 0 <= peer < self.world else "?",
                rc=rc)
            raise ExchangeError(f"rank {self.rank}: shared-memory all-to-all: {self.broken}")

    def close(self) -> None:
        self.broken = self.broken or "closed"
        del self._view
        self._segment.close()


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 if unknown): peers' pids are only checked
    for liveness when they share it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
