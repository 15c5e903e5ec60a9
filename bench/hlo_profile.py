"""Static profile of the compiled train step: the bytes each XLA kernel reads and writes and the
matmul FLOPs, summed per source line of ours, with a roofline time per line (no GPU needed).

    python bench/hlo_profile.py --config=configs/ettin_150m.py:mlm --target=h100 --batch=32
    python bench/hlo_profile.py --config=configs/ettin_150m.py:mlm --target=h100 --seq_len=8192 --batch=4
    python bench/hlo_profile.py --hlo=step.hlo --device_kind=H200   # a saved compiled.as_text()

`bench/train_step.py --profile` times each operation on a GPU; this reads the program XLA
compiled for one (`--target=h100`, bench/aot_gpu.py, nothing autotuned) or for this machine,
and says where its memory traffic and FLOPs are before any GPU time is spent. A kernel is an
instruction of the entry computation or of a loop body (counted the loop's known trip count
times): a fusion, a custom call (Triton/Mosaic attention, cuBLAS), a copy. Its bytes are its
operands plus its results, except that an operand the kernel only slices counts the slices,
and an in-place update (dynamic-update-slice) counts the update, not the whole buffer. Its
FLOPs are 2 x output elements x contracted size of each dot in it; our Triton attention
kernels' are the dots of the tiles they visit when every row is one document (packed rows
visit fewer), their mask read from the op name (`ettin_jax.attention.mask_scope`); Mosaic GPU
kernels have bytes only. The roofline time of a kernel is max(FLOPs / peak, bytes / memory
bandwidth); a line's time is the sum over its kernels, and the step's the sum over all
(kernels run one after another). Bytes are counted as if nothing stayed in L2 cache, so the
"everything else" figure overestimates HBM traffic; treat the time as a guide to where to
look, not a measurement.

Kernels are attributed to the innermost frame of ours (file:line function) that XLA's
metadata records, split into forward and backward (`transpose` in the operation's name).
With --results the table is appended to bench/RESULTS.md (bench/results.py).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import attention, cli  # noqa: E402  # pylint: disable=wrong-import-position
from ettin_jax.kernels.flash_attention import (  # noqa: E402  # pylint: disable=wrong-import-position
    KERNEL_DOTS, kernel_flops)
from bench import aot_gpu, results  # noqa: E402  # pylint: disable=wrong-import-position

# Memory bandwidth (bytes/s) by device kind; the FLOP/s peaks are ettin_jax.train_metrics'.
MEMORY_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "H800": 3.35e12, "A100": 2.0e12,
                    "B200": 8.0e12}
ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                 "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                 "c64": 8, "c128": 16}
_DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
_ARRAY = re.compile(r"\b(pred|bf16|f8e4m3fn|f8e5m2|c64|c128|[suf]\d+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
# Instructions that launch nothing: views, tuples, parameters and constants.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_SLICES = {"dynamic-slice", "slice", "gather"}
# Elementwise ops: inside a fusion an operand that reaches only slices through them is read
# at the sliced elements only (the fused kernel computes them there).
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "convert",
                "select", "compare", "exponential", "log", "negate", "abs", "tanh", "and",
                "or", "not", "sqrt", "rsqrt", "power", "clamp", "copy", "erf", "logistic"}


def array_bytes(type_text: str) -> int:
    """Bytes of every array type written in `type_text` ("f32[8,128]{1,0}", tuples too)."""
    return sum(ELEMENT_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
    return [int(d) for d in _ARRAY.findall(type_text)[0][1].split(",") if d]


@dataclasses.dataclass
class Instruction:
    name: str
    type: str          # result type text
    opcode: str
    operands: list     # operand instruction names
    line: str          # the whole text line (attributes, metadata)

    def attribute(self, pattern: str):
        match = re.search(pattern, self.line)
        return match.group(1) if match else None


@dataclasses.dataclass
class Kernel:
    where: str         # "file:line function" of ours, or the opcode
    backward: bool
    kind: str          # matmul | attention | other
    bytes: int
    flops: int
    count: int         # launches (trip counts included)


class Module:
    """A compiled HLO module's text (`compiled.as_text()`), parsed enough to profile it."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            header = _COMPUTATION.match(line)
            if header:
                current = self.computations[header.group(2)] = []
                self.entry = header.group(2) if header.group(1) else self.entry
            elif line.strip() == "}":
                current = None
            elif current is not None:
                match = _INSTRUCTION.match(line)
                if match:
                    name, type_text, opcode, rest = match.groups()
                    current.append(Instruction(name, type_text, opcode,
                                               re.findall(r"%([\w.\-]+)", _operand_text(rest)), line))
        if self.entry is None:
            raise ValueError("no ENTRY computation: not the text of a compiled HLO module")
        self.by_name = {i.name: i for c in self.computations.values() for i in c}
        self.frames = _stack_frames(text)

    def where(self, instruction: Instruction) -> str:
        frame = instruction.attribute(r"stack_frame_id=(\d+)")
        return self.frames.get(frame, instruction.opcode)

    def kernels(self) -> list[Kernel]:
        """Every kernel launch of one run of the module, loop bodies times their trip count."""
        found = []
        self._walk(self.entry, 1, found)
        return found

    def _walk(self, computation: str, times: int, found: list):
        for ins in self.computations[computation]:
            if ins.opcode in _FREE:
                continue
            if ins.opcode == "while":
                trips = ins.attribute(r'"known_trip_count":\{"n":"(\d+)"')
                if trips is None:
                    raise ValueError(f"{ins.name}: a loop without a known trip count")
                self._walk(ins.attribute(r"body=%([\w.\-]+)"), times * int(trips), found)
                continue
            if ins.opcode in ("conditional", "call"):
                # A conditional counts its first branch (the step's one is the update guard).
                called = ins.attribute(r"(?:true_computation|to_apply)=%([\w.\-]+)") or \
                    ins.attribute(r"branch_computations=\{%([\w.\-]+)")
                self._walk(called, times, found)
                continue
            target = ins.attribute(r'custom_call_target="([^"]+)"') or ""
            op_name = ins.attribute(r'op_name="([^"]*)"') or ""
            if ins.opcode == "custom-call" and ("triton" in target or "mosaic" in target):
                kind, flops = "attention", self._attention_flops(ins, op_name)
            else:
                flops = self._flops(ins)
                kind = "matmul" if flops else "other"
            found.append(Kernel(self.where(ins), "transpose(" in op_name, kind,
                                times * self._bytes(ins), times * flops, times))

    def _bytes(self, ins: Instruction) -> int:
        fused = ins.attribute(r"calls=%([\w.\-]+)") if ins.opcode == "fusion" else None
        if fused is None:
            if ins.opcode in _SLICES:
                return 2 * array_bytes(ins.type)
            if ins.opcode == "dynamic-update-slice":
                return 2 * array_bytes(self.by_name[ins.operands[1]].type)
            # A cuBLAS call's second result is its scratch workspace, not traffic.
            result = _ARRAY.search(ins.type).group(0) if _is_library_matmul(ins) else ins.type
            return array_bytes(result) + sum(array_bytes(self.by_name[o].type)
                                             for o in ins.operands if o in self.by_name)
        body = self.computations[fused]
        params = {int(i.attribute(r"parameter\((\d+)\)")): i.name
                  for i in body if i.opcode == "parameter"}
        users = collections.defaultdict(list)
        for i in body:
            for operand in i.operands:
                users[operand].append(i)
        local = {i.name: i for i in body}
        read = 0
        for index, operand in enumerate(ins.operands):
            read += self._read(params.get(index), users, array_bytes(self.by_name[operand].type)
                               if operand in self.by_name else 0)
        root = next(i for i in body if i.line.lstrip().startswith("ROOT"))
        outputs = [local[o] for o in root.operands] if root.opcode == "tuple" else [root]
        written = sum(array_bytes(local[o.operands[1]].type) if o.opcode == "dynamic-update-slice"
                      else array_bytes(o.type) for o in outputs)
        return read + written

    def _read(self, param: str | None, users: dict, full: int) -> int:
        """Bytes a fusion reads of the parameter `param`: the slices taken of it when every use
        slices it (through bitcasts and same-shape elementwise ops), nothing when it is only
        the buffer updated in place."""
        if param is None:
            return full
        param_type = self.by_name[param].type
        total, frontier, seen = 0, [param], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            if name != param and not users.get(name):
                return full      # an elementwise result that is the fusion's output
            for user in users.get(name, []):
                if user.opcode == "bitcast" or (user.opcode in _ELEMENTWISE
                                                and _dims(user.type) == _dims(param_type)):
                    frontier.append(user.name)
                elif user.opcode in _SLICES and user.operands[0] == name:
                    total += array_bytes(user.type)
                elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
                    pass
                else:
                    return full
        return min(total, full)

    def _attention_flops(self, ins: Instruction, op_name: str) -> int:
        """Dot FLOPs of one of our Triton attention kernels (`flash_attention.kernel_flops`: the
        tiles it visits when every row is one document), its mask read from the op name's
        `attention.mask_scope`; 0 for other kernels (Mosaic GPU), priced by their bytes."""
        kernel = ins.attribute(r'\bname = "(ettin_flash_\w+)"')
        mask = attention.mask_from_scope(op_name)
        if kernel not in KERNEL_DOTS or mask is None:
            return 0
        dtype, dims = _ARRAY.findall(self.by_name[ins.operands[0]].type)[0]
        batch, seq, heads, head_dim = (int(d) for d in dims.split(","))
        causal, window_size = mask
        return kernel_flops(batch, seq, heads, head_dim, _DTYPE_NAMES[dtype], causal,
                            window_size)[kernel]

    def _flops(self, ins: Instruction) -> int:
        if ins.opcode == "dot":
            contracted = ins.attribute(r"lhs_contracting_dims=\{([\d,]*)\}") or ""
            lhs = _dims(self.by_name[ins.operands[0]].type)
            return 2 * math.prod(_dims(ins.type)) * math.prod(
                lhs[int(d)] for d in contracted.split(",") if d)
        if _is_library_matmul(ins):
            contracted = ins.attribute(r'"lhs_contracting_dimensions":\[([^\]]*)\]') or ""
            lhs = _dims(self.by_name[ins.operands[0]].type)
            return 2 * math.prod(_dims(ins.type)) * math.prod(
                lhs[int(d.strip('"'))] for d in contracted.split(",") if d.strip('"'))
        called = ins.attribute(r"calls=%([\w.\-]+)")
        return sum(self._flops(i) for i in self.computations[called]) if called else 0


def _is_library_matmul(ins: Instruction) -> bool:
    """A cuBLAS call (`__cublas$gemm`, `__cublas$lt$matmul`): XLA's choice, where autotuning
    finds it faster than its Triton GEMM fusion, or with --xla_gpu_enable_triton_gemm=false."""
    target = ins.attribute(r'custom_call_target="([^"]+)"') or ""
    return ins.opcode == "custom-call" and "cublas" in target


def _operand_text(rest: str) -> str:
    """The operand list of an instruction: `rest` up to its closing parenthesis."""
    depth = 0
    for position, char in enumerate(rest):
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return rest[:position]
            depth -= 1
    return rest


def _stack_frames(text: str) -> dict:
    """stack_frame_id -> "file:line function" of the frame's own location (the innermost)."""
    sections = {}
    for title in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        match = re.search(rf"^{title}\n(.*?)(?:\n\n|\n(?=[A-Z%]))", text, re.M | re.S)
        sections[title] = match.group(1) if match else ""
    files = dict(re.findall(r'^(\d+) "([^"]*)"', sections["FileNames"], re.M))
    functions = dict(re.findall(r'^(\d+) "([^"]*)"', sections["FunctionNames"], re.M))
    locations = {
        location: f"{os.path.basename(files.get(file, '?'))}:{line} {functions.get(function, '?')}"
        for location, file, function, line in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)",
            sections["FileLocations"], re.M)}
    return {frame: locations.get(location, "?") for frame, location in re.findall(
        r"^(\d+) \{file_location_id=(\d+)", sections["StackFrames"], re.M)}


@dataclasses.dataclass
class Line:
    where: str
    backward: bool
    kind: str
    bytes: int = 0
    flops: int = 0
    count: int = 0
    seconds: float = 0.0


def summarize(kernels: list[Kernel], peak_flops: float, bandwidth: float) -> dict:
    """Totals per kind and per source line (with roofline seconds), lines by time."""
    lines = {}
    totals = collections.defaultdict(lambda: Line("", False, ""))
    for k in kernels:
        seconds = max(k.flops / peak_flops, k.bytes / bandwidth)
        line = lines.setdefault((k.where, k.backward, k.kind), Line(k.where, k.backward, k.kind))
        for target in (line, totals[k.kind]):
            target.bytes += k.bytes
            target.flops += k.flops
            target.count += k.count
            target.seconds += seconds
    return {"totals": dict(totals),
            "lines": sorted(lines.values(), key=lambda line: -line.seconds)}


def report(summary: dict, title: str, top: int) -> tuple[str, str, list, list]:
    """Printable text, its totals line, and the (header, rows) of the per-line table."""
    totals = summary["totals"]
    step = sum(t.seconds for t in totals.values())
    text = [title, f"Roofline step time {step * 1e3:.1f} ms: " + ", ".join(
        f"{kind} {t.seconds * 1e3:.1f} ms ({t.bytes / 1e9:.1f} GB, {t.flops / 1e12:.2f} TFLOP, "
        f"{t.count} kernels)" for kind, t in sorted(totals.items()))]
    header = ["ms", "share", "GB", "TFLOP", "kernels", "pass", "kind", "where"]
    rows = [[f"{line.seconds * 1e3:.2f}", f"{line.seconds / step:.1%}", f"{line.bytes / 1e9:.2f}",
             f"{line.flops / 1e12:.2f}", line.count, "bwd" if line.backward else "fwd",
             line.kind, line.where] for line in summary["lines"][:top]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    text += ["  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join(text), text[1] + ".", header, rows


def device_figures(kind: str) -> tuple[float, float]:
    """(peak bf16 FLOP/s, memory bandwidth bytes/s) of a device kind."""
    from ettin_jax import train_metrics  # pylint: disable=import-outside-toplevel
    peak = next((p for name, p in train_metrics.PEAK_FLOPS.items() if name in kind), None)
    bandwidth = next((b for name, b in MEMORY_BANDWIDTH.items() if name in kind), None)
    if peak is None or bandwidth is None:
        raise cli.UserError(f"no peak FLOP/s or memory bandwidth known for device kind {kind!r}: "
                            f"pass --device_kind with one of {sorted(MEMORY_BANDWIDTH)}")
    return peak, bandwidth


def define_flags():
    config_flags.DEFINE_config_file("config", None, "FILE:ARG, e.g. configs/ettin_150m.py:mlm",
                                    lock_config=False)
    flags.DEFINE_integer("batch", 32, "rows of the micro batch compiled")
    flags.DEFINE_integer("seq_len", 1024, "tokens per row")
    flags.DEFINE_enum("target", "", ["", *aot_gpu.TARGETS], "compile for this GPU on a machine "
                      "without one (bench/aot_gpu.py) instead of for this machine's device")
    flags.DEFINE_string("hlo", None, "profile this saved HLO text (compiled.as_text()) instead "
                        "of compiling --config")
    flags.DEFINE_string("hlo_out", None, "also write the compiled step's HLO text here")
    flags.DEFINE_string("device_kind", None, "device whose peak and bandwidth price the kernels "
                        f"(one of {sorted(MEMORY_BANDWIDTH)}); default: the compiled-for device")
    flags.DEFINE_string("attention_impl", None, "override config.model.attention_impl")
    flags.DEFINE_string("remat", None, "override config.model.remat (other than none: with "
                        "the layer groups scanned)")
    flags.DEFINE_integer("top", 25, "source lines listed")
    results.define_flags()


FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.target:
        aot_gpu.host_on_cpu()
    import jax  # pylint: disable=import-outside-toplevel
    if FLAGS.hlo:
        if not os.path.exists(FLAGS.hlo):
            raise cli.UserError(f"--hlo={FLAGS.hlo}: no such file")
        with open(FLAGS.hlo, encoding="utf-8") as f:
            text = f.read()
        kind, what = FLAGS.device_kind, f"HLO {FLAGS.hlo}"
        if not kind:
            raise cli.UserError("--hlo needs --device_kind (the card to price the kernels for)")
    else:
        config = FLAGS.config
        if config is None:
            raise cli.UserError("pass --config=FILE:ARG (or --hlo=FILE)")
        from bench import memory  # pylint: disable=import-outside-toplevel
        if FLAGS.attention_impl:
            config.model.attention_impl = FLAGS.attention_impl
        if FLAGS.remat:
            config.model.remat = FLAGS.remat
            config.model.scan_layers |= FLAGS.remat != "none"   # remat needs the scan
        start = time.perf_counter()
        compiled = memory.compiled_step_fn(config, FLAGS.seq_len, FLAGS.target)(FLAGS.batch)
        text = compiled.as_text()
        device = aot_gpu.device(FLAGS.target) if FLAGS.target else jax.devices()[0]
        kind = FLAGS.device_kind or device.device_kind
        what = (f"{config.size}:{config.objective} train step, {FLAGS.batch} x {FLAGS.seq_len}, "
                f"{config.model.dtype}, attention {config.model.attention_impl}, layers "
                f"{'scanned' if config.model.scan_layers else 'unrolled'}, remat "
                f"{config.model.remat}, compiled for {device.device_kind}"
                + (" on this machine without one (nothing autotuned)" if FLAGS.target else "")
                + f" in {time.perf_counter() - start:.0f} s")
        if FLAGS.hlo_out:
            with open(FLAGS.hlo_out, "w", encoding="utf-8") as f:
                f.write(text)
    peak, bandwidth = device_figures(kind)
    summary = summarize(Module(text).kernels(), peak, bandwidth)
    title = (f"Static profile (bench/hlo_profile.py): {what}; priced at {kind}'s "
             f"{peak / 1e12:.0f} TFLOP/s and {bandwidth / 1e12:.2f} TB/s")
    printable, totals, header, rows = report(summary, title, FLAGS.top)
    print(printable, flush=True)
    if FLAGS.results:
        results.append(title, header, rows, where=results.machine(device=False),
                       note=" ".join(filter(None, [totals, FLAGS.note])))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
