"""Make the installed llama-cpp-py-sync wheel load on glibc 2.34 to 2.37 (Debian 12, Ubuntu 22.04).

Its wheel is tagged manylinux2014 but its shared libraries were linked against glibc 2.38, and they
need it only for the C23 variants of strtol & co (`__isoc23_strtol`, `__isoc23_sscanf`, ...), which
a compiler emits for C23/C++ sources on glibc >= 2.38. On an older glibc dlopen fails with
"version `GLIBC_2.38' not found". This script rebinds those references, in place, to the classic
functions (`strtol@GLIBC_2.2.5`, ...): each dynamic symbol's name is pointed at the suffix of its own
string ("__isoc23_strtol" -> "strtol") and its version at GLIBC_2.2.5, and the GLIBC_2.38
requirement is rewritten as a second GLIBC_2.2.5 one. Nothing else in the files changes. The only
behavioural difference is that the classic functions do not read C23's "0b" binary prefix.

It does nothing where glibc is >= 2.38, where the package is absent, or where the files need no
change (so it can run on every `make test`); it refuses any other GLIBC_2.38 symbol, and ends by
loading the library in a fresh interpreter (exit status 1 if that still fails).

    .venv/bin/python scripts/llama_cpp_glibc.py
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

PREFIX = b"__isoc23_"
NEEDED = b"GLIBC_2.38"
BASE = b"GLIBC_2.2.5"  # the x86_64 baseline, where strtol, sscanf & co are defined
SHT_DYNSYM, SHT_VERNEED, SHT_VERSYM = 11, 0x6FFFFFFE, 0x6FFFFFFF


def glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def patch(b: bytearray) -> list[str]:
    """Rebind the __isoc23_* references of one ELF64 little-endian shared library; returns their names
    ([] when the file needs no change). Raises ValueError for anything it does not recognize."""
    if b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    shoff = struct.unpack_from("<Q", b, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", b, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    by_type = {s[1]: s for s in sections}  # (name, type, flags, addr, offset, size, link, info, ...)
    if not {SHT_DYNSYM, SHT_VERNEED, SHT_VERSYM} <= by_type.keys():
        return []
    dynsym, verneed, versym = by_type[SHT_DYNSYM], by_type[SHT_VERNEED], by_type[SHT_VERSYM]
    strtab = sections[dynsym[6]][4]

    def string(off: int) -> bytes:
        return bytes(b[strtab + off : b.index(0, strtab + off)])

    needed = base = None  # (offset of the Vernaux entry, its version index); (index, name, hash)
    o = verneed[4]
    for _ in range(verneed[7]):  # Verneed: version, count, file, aux offset, next offset
        _, cnt, file, aux, nxt = struct.unpack_from("<HHIII", b, o)
        if string(file) == b"libc.so.6":
            a = o + aux
            for _ in range(cnt):  # Vernaux: hash, flags, index, name, next offset
                h, _, index, name, anext = struct.unpack_from("<IHHII", b, a)
                if string(name) == NEEDED:
                    needed = (a, index)
                elif string(name) == BASE:
                    base = (index, name, h)
                a += anext
        o += nxt
    if needed is None:
        return []
    if base is None:
        raise ValueError(f"needs {NEEDED.decode()} but has no {BASE.decode()} requirement to rebind to")
    names = []
    for i in range(dynsym[5] // 24):
        sym, ver = dynsym[4] + i * 24, versym[4] + 2 * i
        if struct.unpack_from("<H", b, ver)[0] & 0x7FFF != needed[1]:
            continue
        st_name = struct.unpack_from("<I", b, sym)[0]
        name = string(st_name)
        if not name.startswith(PREFIX) or struct.unpack_from("<H", b, sym + 6)[0] != 0:  # undefined only
            raise ValueError(f"{name.decode()}@{NEEDED.decode()} is not a C23 variant this script knows")
        struct.pack_into("<I", b, sym, st_name + len(PREFIX))
        struct.pack_into("<H", b, ver, base[0])
        names.append(name.decode())
    struct.pack_into("<I", b, needed[0], base[2])  # vna_hash
    struct.pack_into("<I", b, needed[0] + 8, base[1])  # vna_name
    return names


def main() -> int:
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None or not spec.submodule_search_locations:
        print("llama-cpp-py-sync is not installed: nothing to do")
        return 0
    v = glibc_version()
    if v is None or v >= (2, 38):
        print(f"glibc {v and '.'.join(map(str, v))}: llama-cpp-py-sync needs no change")
        return 0
    pkg = Path(next(iter(spec.submodule_search_locations)))
    for f in sorted(pkg.glob("*.so*")):
        if f.is_symlink() or not f.is_file():
            continue
        b = bytearray(f.read_bytes())
        try:
            names = patch(b)
        except ValueError as e:
            print(f"{f}: {e}; not changed", file=sys.stderr)
            return 1
        if names:
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_bytes(b)
            os.chmod(tmp, f.stat().st_mode)
            os.replace(tmp, f)
            print(f"{f.name}: {', '.join(names)} -> {BASE.decode()}")
    check = "from llama_cpp_py_sync._cffi_bindings import get_lib; get_lib()"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp still does not load:\n{r.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"llama-cpp-py-sync loads on glibc {'.'.join(map(str, v))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
