"""Finds instructions newer than the x86-64 baseline (x86-64-v1: SSE2 and before) in an ELF
file, by disassembling it (objdump), and names the function each one is in: the check that a
file compiled for the baseline stays there (tests/test_portable.py).

Counted: SSE3, SSSE3, SSE4.1/4.2, POPCNT, LZCNT, BMI1/2, MOVBE, CMPXCHG16B, SHA, AES,
PCLMULQDQ, RDRAND/RDSEED, ADX, and everything VEX or EVEX encoded (AVX, AVX2, FMA, F16C,
AVX-512: any v-prefixed vector instruction or a ymm/zmm/mask register). Not counted: TZCNT,
which is `rep bsf` and runs as BSF on CPUs without BMI (compilers emit it for generic x86-64).
"""

import re
import subprocess

NEWER = {
    # SSE3
    "addsubpd", "addsubps", "haddpd", "haddps", "hsubpd", "hsubps", "lddqu", "movddup",
    "movshdup", "movsldup", "fisttp", "fisttps", "fisttpl", "fisttpll", "monitor", "mwait",
    # SSSE3
    "pabsb", "pabsw", "pabsd", "palignr", "phaddw", "phaddd", "phaddsw", "phsubw", "phsubd",
    "phsubsw", "pmaddubsw", "pmulhrsw", "pshufb", "psignb", "psignw", "psignd",
    # SSE4.1
    "blendpd", "blendps", "blendvpd", "blendvps", "dppd", "dpps", "extractps", "insertps",
    "movntdqa", "mpsadbw", "packusdw", "pblendvb", "pblendw", "pcmpeqq", "pextrb", "pextrd",
    "pextrq", "phminposuw", "pinsrb", "pinsrd", "pinsrq", "pmaxsb", "pmaxsd", "pmaxud",
    "pmaxuw", "pminsb", "pminsd", "pminud", "pminuw", "pmovsxbd", "pmovsxbq", "pmovsxbw",
    "pmovsxdq", "pmovsxwd", "pmovsxwq", "pmovzxbd", "pmovzxbq", "pmovzxbw", "pmovzxdq",
    "pmovzxwd", "pmovzxwq", "pmuldq", "pmulld", "ptest", "roundpd", "roundps", "roundsd",
    "roundss",
    # SSE4.2, POPCNT, LZCNT
    "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm", "pcmpgtq", "crc32b", "crc32w", "crc32l",
    "crc32q", "popcnt", "popcntw", "popcntl", "popcntq", "lzcnt", "lzcntw", "lzcntl", "lzcntq",
    # BMI1/2, MOVBE, CX16, ADX, RDRAND/RDSEED
    "andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx",
    "shlx", "shrx", "movbe", "cmpxchg16b", "adcx", "adox", "rdrand", "rdseed",
    # SHA, AES, PCLMULQDQ
    "sha1msg1", "sha1msg2", "sha1nexte", "sha1rnds4", "sha256msg1", "sha256msg2", "sha256rnds2",
    "aesdec", "aesdeclast", "aesenc", "aesenclast", "aesimc", "aeskeygenassist", "pclmulqdq",
}
PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "addr32", "bnd", "notrack", "cs", "ds"}
FUNCTION = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\t(.*)$")
WIDE_REGISTER = re.compile(r"%(?:[yz]mm\d+|k[0-7]\b)")


def _mnemonic(text):
    for word in text.split():
        if word not in PREFIXES:
            return word
    return ""


def is_newer(text):
    """Whether one disassembled instruction (objdump's AT&T text) is beyond x86-64-v1."""
    mnemonic = _mnemonic(text)
    base = re.sub(r"[bwlq]$", "", mnemonic) if mnemonic not in NEWER else mnemonic
    if mnemonic in NEWER or base in NEWER:
        return True
    if WIDE_REGISTER.search(text):
        return True
    return mnemonic.startswith("v") and "%xmm" in text


def newer_than_baseline(path):
    """[(function, mnemonic)] of the instructions in `path` newer than the baseline."""
    out = subprocess.run(["objdump", "-d", "-w", "--no-show-raw-insn", path], capture_output=True,
                         text=True, check=True).stdout
    found, function = [], "?"
    for line in out.splitlines():
        header = FUNCTION.match(line)
        if header:
            function = header.group(1).split("@")[0]
            continue
        match = INSTRUCTION.match(line)
        if match and is_newer(match.group(1)):
            found.append((function, _mnemonic(match.group(1))))
    return found
