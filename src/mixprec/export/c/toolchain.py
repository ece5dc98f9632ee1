"""Compile and run the generated C: a host test runner (gcc) and Cortex-M4 firmware
(arm-none-eabi-gcc, run under ``qemu-system-arm -M mps2-an386`` with semihosting).

The host runner reads int32 inputs (samples back to back) from a binary file and writes int32
outputs; one runner can hold several models (one translation unit, distinct prefixes), selected by
index on the command line.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base import ExportError

HOST_CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")
ARM_CFLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-Os", "-std=c99",
              "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections")
ARM_LDFLAGS = ("-nostartfiles", "--specs=nano.specs", "--specs=rdimon.specs", "-Wl,--gc-sections")
QEMU_MACHINE = "mps2-an386"


class ToolchainError(ExportError):
    """A compiler or emulator failed; the message holds its command and output."""


def host_cc() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def arm_tools() -> dict[str, str] | None:
    """Paths of arm-none-eabi-gcc and arm-none-eabi-size, or None when either is missing."""
    gcc, size = shutil.which("arm-none-eabi-gcc"), shutil.which("arm-none-eabi-size")
    return {"gcc": gcc, "size": size} if gcc and size else None


def qemu_arm() -> str | None:
    return shutil.which("qemu-system-arm")


def _run(cmd: list[str], cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ToolchainError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


# ----------------------------------------------------------------------------- host runner


def host_driver_source(models: list[tuple[str, str]]) -> str:
    """A runner for ``models`` = [(prefix, path of its model.h as the driver includes it)]:
    ``runner INDEX INPUT.bin OUTPUT.bin`` (int32 little-endian samples back to back)."""
    heads = "\n".join(f'#include "{h}"' for _, h in models)
    fns, rows = [], []
    for k, (p, _) in enumerate(models):
        P = p.upper()
        fns.append(f"""static int run_{k}(const int32_t *in, int32_t *out) {{
    static {p}_in_t x[{P}_INPUT_NUMEL];
    static {p}_out_t y[{P}_OUTPUT_NUMEL];
    uint32_t i;
    for (i = 0; i < {P}_INPUT_NUMEL; ++i) x[i] = ({p}_in_t)in[i];
    if ({p}_model_run(x, y) != 0) return 1;
    for (i = 0; i < {P}_OUTPUT_NUMEL; ++i) out[i] = (int32_t)y[i];
    return 0;
}}""")
        rows.append(f"    {{ {P}_INPUT_NUMEL, {P}_OUTPUT_NUMEL, run_{k} }},")
    return f"""/* mixprec host test runner: runner INDEX INPUT.bin OUTPUT.bin (int32 samples back to back) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
{heads}

{chr(10).join(fns)}

typedef struct {{ uint32_t in_numel, out_numel; int (*run)(const int32_t *, int32_t *); }} runner_model;
static const runner_model models[] = {{
{chr(10).join(rows)}
}};

int main(int argc, char **argv) {{
    FILE *f;
    long bytes;
    size_t n, k;
    int32_t *in, *out;
    const runner_model *m;
    int index;
    if (argc != 4) {{
        fprintf(stderr, "usage: %s INDEX INPUT.bin OUTPUT.bin\\n", argv[0]);
        return 2;
    }}
    index = atoi(argv[1]);
    if (index < 0 || (size_t)index >= sizeof(models) / sizeof(models[0])) return 2;
    m = &models[index];
    f = fopen(argv[2], "rb");
    if (!f) return 3;
    fseek(f, 0, SEEK_END);
    bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    n = (size_t)bytes / (4u * m->in_numel);
    in = (int32_t *)malloc(n * m->in_numel * 4u + 4u);
    out = (int32_t *)malloc(n * m->out_numel * 4u + 4u);
    if (!in || !out || fread(in, 4u, n * m->in_numel, f) != n * m->in_numel) return 4;
    fclose(f);
    for (k = 0; k < n; ++k)
        if (m->run(in + k * m->in_numel, out + k * m->out_numel) != 0) return 5;
    f = fopen(argv[3], "wb");
    if (!f || fwrite(out, 4u, n * m->out_numel, f) != n * m->out_numel) return 6;
    fclose(f);
    free(in);
    free(out);
    return 0;
}}
"""


def compile_host(sources: list[Path], exe: Path, include_dirs: list[Path] = (), cflags=HOST_CFLAGS) -> list[str]:
    cc = host_cc()
    if cc is None:
        raise ToolchainError("no host C compiler (gcc or cc) on PATH")
    cmd = [cc, *cflags, *[f"-I{d}" for d in include_dirs], "-o", str(exe), *map(str, sources)]
    exe.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd)
    return cmd


def run_host(exe: Path, index: int, codes: np.ndarray, out_numel: int, work: Path) -> np.ndarray:
    """Outputs (N, out_numel) int64 of model ``index`` of a runner on int32 ``codes`` (N, in_numel)."""
    work.mkdir(parents=True, exist_ok=True)
    fin, fout = work / f"in_{index}.bin", work / f"out_{index}.bin"
    np.ascontiguousarray(codes, dtype="<i4").tofile(fin)
    _run([str(exe), str(index), str(fin), str(fout)])
    out = np.fromfile(fout, dtype="<i4").astype(np.int64)
    return out.reshape(len(codes), out_numel)


# ----------------------------------------------------------------------------- firmware


def section_sizes(elf: Path, size_tool: str) -> dict[str, int]:
    """``arm-none-eabi-size -A``: section name -> bytes."""
    out = _run([size_tool, "-A", str(elf)]).stdout
    sizes = {}
    for line in out.splitlines():
        m = re.match(r"^(\.\S+)\s+(\d+)\s+(\d+)", line.strip())
        if m:
            sizes[m.group(1)] = sizes.get(m.group(1), 0) + int(m.group(2))
    return sizes


def compile_arm(sources: list[Path], out: Path, include_dirs: list[Path], linker_script: Path | None = None,
                compile_only: bool = False) -> list[str]:
    tools = arm_tools()
    if tools is None:
        raise ToolchainError("arm-none-eabi-gcc / arm-none-eabi-size not on PATH "
                             "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")
    cmd = [tools["gcc"], *ARM_CFLAGS, *[f"-I{d}" for d in include_dirs]]
    if compile_only:
        cmd += ["-c"]
    else:
        cmd += [*ARM_LDFLAGS, f"-T{linker_script}", f"-Wl,-Map={out.with_suffix('.map')}"]
    cmd += ["-o", str(out), *map(str, sources)]
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd)
    return cmd


@dataclass
class QemuResult:
    returncode: int
    output: str
    seconds: float
    mismatching_inputs: int | None
    mismatching_outputs: int | None
    inputs: int | None


def run_qemu(elf: Path, timeout: float = 300.0) -> QemuResult:
    qemu = qemu_arm()
    if qemu is None:
        raise ToolchainError("qemu-system-arm not on PATH (apt-get install qemu-system-arm)")
    cmd = [qemu, "-M", QEMU_MACHINE, "-nographic", "-monitor", "none", "-semihosting", "-kernel", str(elf)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ToolchainError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s:\n{exc.stdout or ''}") from exc
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    m = re.search(r"mixprec firmware: (\d+) inputs, (\d+) mismatching inputs, (\d+) mismatching outputs", text)
    return QemuResult(proc.returncode, text, seconds, int(m.group(2)) if m else None, int(m.group(3)) if m else None,
                      int(m.group(1)) if m else None)
