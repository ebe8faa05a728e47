"""Make a converted layer's ext4 bytes reproducible: fixed times where the kernel wrote "now".

Applying the same tar twice through the kernel gives the same block allocation (the applier
runs pinned to one CPU on a ``nodelalloc`` mount, and directory placement hashes names with
the fixed hash seed), but not the same bytes: the kernel stamps every inode it touches with
the current time (atime, ctime, crtime), a random generation number and a change counter
whose value depends on timing, stamps deleted inodes with their deletion time, and the
superblock records mount and write times, counters and the last mount point. This module
rewrites exactly those fields, in the blocks the layer itself wrote, so two conversions of
one image give identical layer digests.

ext4 here has no metadata checksums (the converter's mkfs disables metadata_csum and
uninit_bg), so rewriting fields needs no checksum updates.
"""

from __future__ import annotations

import logging
import struct

from ..engine.layered import LayeredDevice
from ..errors import CorruptLayerError

__all__ = ["normalize_ext4"]

log = logging.getLogger(__name__)

SUPERBLOCK = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
# Superblock fields the kernel updates on mount, write and unmount (offset, size).
_SB_VOLATILE = (
    (44, 4), (48, 4),  # s_mtime, s_wtime
    (52, 2),  # s_mnt_count
    (64, 4),  # s_lastcheck
    (136, 64),  # s_last_mounted
    (376, 8),  # s_kbytes_written
    (0x274, 1), (0x275, 1), (0x277, 1),  # s_wtime_hi, s_mtime_hi, s_lastcheck_hi
)


async def normalize_ext4(device: LayeredDevice, *, timestamp: int) -> int:
    """Rewrite the volatile superblock fields and the kernel-stamped inode fields of every
    inode-table block the device's upper layer holds. Returns the blocks rewritten."""
    upper = device.upper
    if upper is None:
        raise ValueError("normalize_ext4 needs the writable layer")
    sb = bytearray(await device.read_at(SUPERBLOCK, 1024))
    magic, = struct.unpack_from("<H", sb, 56)
    if magic != EXT4_MAGIC:
        raise CorruptLayerError("not an ext4 filesystem", field="s_magic", offset=SUPERBLOCK + 56,
                                expected=EXT4_MAGIC, actual=magic)
    block_size = 1024 << struct.unpack_from("<I", sb, 24)[0]
    blocks_per_group, inodes_per_group = struct.unpack_from("<I", sb, 32)[0], \
        struct.unpack_from("<I", sb, 40)[0]
    inode_size = struct.unpack_from("<H", sb, 88)[0]
    first_data_block = struct.unpack_from("<I", sb, 20)[0]
    blocks = struct.unpack_from("<I", sb, 4)[0] | (struct.unpack_from("<I", sb, 0x150)[0] << 32)
    groups = -(-(blocks - first_data_block) // blocks_per_group)
    is64 = bool(struct.unpack_from("<I", sb, 96)[0] & INCOMPAT_64BIT)
    desc_size = struct.unpack_from("<H", sb, 254)[0] if is64 else 32
    rewritten = 0
    for offset, size in _SB_VOLATILE:
        sb[offset : offset + size] = bytes(size)
    struct.pack_into("<I", sb, 44, timestamp & 0xFFFFFFFF)
    struct.pack_into("<I", sb, 48, timestamp & 0xFFFFFFFF)
    struct.pack_into("<I", sb, 64, timestamp & 0xFFFFFFFF)
    await device.write_at(SUPERBLOCK, bytes(sb))
    rewritten += 1

    # The inode tables, from the group descriptors right after the superblock's block.
    gdt_offset = (first_data_block + 1) * block_size
    gdt = await device.read_at(gdt_offset, groups * desc_size)
    table_blocks = -(-inodes_per_group * inode_size // block_size)
    written = [(off * 512, (off + n) * 512) for off, n, _m, zeroed in upper.index.records()
               if not zeroed]
    for group in range(groups):
        base = group * desc_size
        table = struct.unpack_from("<I", gdt, base + 8)[0]
        if is64 and desc_size >= 64:
            table |= struct.unpack_from("<I", gdt, base + 0x28)[0] << 32
        start, end = table * block_size, (table + table_blocks) * block_size
        for lo, hi in _overlaps(written, start, end):
            first = lo - lo % block_size
            for block_offset in range(first, hi, block_size):
                data = bytearray(await device.read_at(block_offset, block_size))
                if _normalize_inodes(data, inode_size, timestamp):
                    await device.write_at(block_offset, bytes(data))
                    rewritten += 1
    return rewritten


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    return [(max(lo, start), min(hi, end)) for lo, hi in ranges if lo < end and hi > start]


def _normalize_inodes(block: bytearray, inode_size: int, timestamp: int) -> bool:
    """Live inodes: atime, ctime and crtime become the mtime the tar gave them. Deleted
    inodes (the kernel truncates them on eviction, stamping mtime too): every time becomes
    ``timestamp``. Both: generation and change counter 0."""
    changed = False
    for base in range(0, len(block), inode_size):
        inode = block[base : base + inode_size]
        if inode.count(0) == len(inode):
            continue
        links, = struct.unpack_from("<H", inode, 26)
        dtime, = struct.unpack_from("<I", inode, 20)
        deleted = links == 0 or dtime != 0
        if deleted:
            struct.pack_into("<I", inode, 16, timestamp & 0xFFFFFFFF)
            struct.pack_into("<I", inode, 20, timestamp & 0xFFFFFFFF)
        mtime, = struct.unpack_from("<I", inode, 16)
        struct.pack_into("<I", inode, 8, mtime)  # atime
        struct.pack_into("<I", inode, 12, mtime)  # ctime
        struct.pack_into("<I", inode, 36, 0)  # l_i_version: counts changes, timing-dependent
        struct.pack_into("<I", inode, 100, 0)  # i_generation: random
        extra, = struct.unpack_from("<H", inode, 128) if inode_size > 128 else (0,)
        if extra >= 24:  # ctime_extra, mtime_extra, atime_extra, crtime, crtime_extra
            if deleted:
                struct.pack_into("<I", inode, 136, 0)
            mtime_extra, = struct.unpack_from("<I", inode, 136)
            struct.pack_into("<I", inode, 132, mtime_extra)
            struct.pack_into("<I", inode, 140, mtime_extra)
            struct.pack_into("<I", inode, 144, mtime)
            struct.pack_into("<I", inode, 148, mtime_extra)
        if extra >= 28:
            struct.pack_into("<I", inode, 152, 0)  # i_version_hi
        if inode != block[base : base + inode_size]:
            block[base : base + inode_size] = inode
            changed = True
    return changed
