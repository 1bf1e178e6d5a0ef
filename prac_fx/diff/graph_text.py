"""Readable, reproducible diffs of FX graphs printed by ``GraphModule.print_readable``.

``normalise(code)`` removes what changes from run to run or machine to machine and is not part of
the graph: absolute source paths (kept as file basenames), ``<eval_with_key>.N`` counters, memory
addresses, uuids, Inductor buffer numbers (renumbered in order of appearance) and the
``;  x = y = None`` liveness notes. The signature and ``return`` tuple are split one item a line,
so an added input or saved tensor is one line of the diff.

``align(before, after)`` renames the nodes of ``after`` to those of ``before`` they match, and
``unified(before, after, ...)`` then compares the two. The pass inserts nodes, so
every later counter moves (``mm_7`` in one graph is ``mm_9`` in the other) and a plain text diff
marks the whole tail as changed. Nodes are matched on their line with node names reduced to
their stem (``mm_7`` -> ``mm``), by longest matching blocks (difflib); matched nodes of ``after``
take the names of ``before``, unmatched ones keep theirs unless ``before`` defines the same name,
in which case they get the next free counter of their stem. What remains in the unified diff is
what changed. The result is deterministic: same graphs in, same text out.

``parse(code)`` gives each defined node's op and named arguments, which the saved-tensor
accounting uses to find the storage a view shares.
"""
from __future__ import annotations

import dataclasses
import difflib
import re

_DEF = re.compile(r'^(?P<indent>\s*)(?P<name>[A-Za-z_]\w*)(?::\s*"(?P<ann>[^"]*)")?\s*=\s*(?P<rhs>.+)$')
_SIG = re.compile(r"^(?P<indent>\s*)def (?P<fn>\w+)\((?P<args>.*)\):\s*$")
_RET = re.compile(r"^(?P<indent>\s*)return (?P<open>[(\[])(?P<body>.*)(?P<close>[)\]])\s*$")
_IDENT = re.compile(r"(?<![\w.'\"])([A-Za-z_]\w*)")
_DEAD = re.compile(r";\s+(?:[A-Za-z_]\w*\s*=\s*)+None\s*$")
_FILE = re.compile(r"(# File: )(?:[^:]*[/\\])?([^/\\:]+\.py)")
_EVAL = re.compile(r"<eval_with_key>\.\d+")
_ADDR = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_BUF = re.compile(r"\bbuf(\d+)\b")
_STEM = re.compile(r"^(.*?)(?:_(\d+))?$")
_SHAPE = re.compile(r"^(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]$")


def stem(name: str) -> str:
    """``mm_7`` -> ``mm``; ``primals_12`` -> ``primals``; ``x`` -> ``x``."""
    return _STEM.match(name).group(1) or name


def _split_top(body: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    items, depth, quote, cur = [], 0, "", []
    for ch in body:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur).strip())
    return items


def normalise(code: str) -> list[str]:
    """The lines of ``code`` with run- and machine-specific text replaced (see module docstring)."""
    bufs: dict[str, str] = {}

    def buf(m):
        return bufs.setdefault(m.group(0), f"buf{len(bufs)}")

    lines: list[str] = []
    for raw in code.rstrip().splitlines():
        line = raw.rstrip()
        line = _FILE.sub(r"\1\2", line)
        line = _EVAL.sub("<eval_with_key>", line)
        line = _UUID.sub("<uuid>", line)
        line = _ADDR.sub("0x?", line)
        line = _BUF.sub(buf, line)
        if not line.lstrip().startswith("#"):
            line = _DEAD.sub("", line)
        sig, ret = _SIG.match(line), _RET.match(line)
        if sig:
            pad = sig["indent"] + "    "
            lines.append(f"{sig['indent']}def {sig['fn']}(")
            lines.extend(f"{pad}{a}," for a in _split_top(sig["args"]))
            lines.append(f"{sig['indent']}):")
        elif ret and len(_split_top(ret["body"])) > 1:
            pad = ret["indent"] + "    "
            lines.append(f"{ret['indent']}return {ret['open']}")
            lines.extend(f"{pad}{a}," for a in _split_top(ret["body"]))
            lines.append(f"{ret['indent']}{ret['close']}")
        else:
            lines.append(line)
    return lines


@dataclasses.dataclass
class Node:
    name: str
    annotation: str  # "f32[32, 64]", "" for lists and scalars
    op: str  # "torch.ops.aten.mm.default", "getitem" for ``x[0]``, "input" for placeholders
    args: list[str]  # the positional arguments that are names (``args[0]`` is a view's base)
    line: int

    @property
    def first_arg(self) -> str | None:
        return (self.args[0] or None) if self.args else None

    @property
    def dtype(self) -> str:
        m = _SHAPE.match(self.annotation)
        return m["dtype"] if m else ""

    @property
    def shape(self) -> list[int] | None:
        m = _SHAPE.match(self.annotation)
        if not m:
            return None
        dims = [d.strip() for d in m["dims"].split(",") if d.strip()]
        return [int(d) if d.lstrip("-").isdigit() else d for d in dims]


def parse(code: str) -> dict[str, Node]:
    """The nodes defined by printed graph ``code``, inputs included, by name, in order."""
    nodes: dict[str, Node] = {}
    for i, raw in enumerate(code.splitlines()):
        line = raw.strip()
        sig = _SIG.match(raw)
        if sig:
            for arg in _split_top(sig["args"]):
                name, _, ann = arg.partition(":")
                name = name.strip()
                if name != "self":
                    nodes[name] = Node(name, ann.strip().strip('"'), "input", [], i)
            continue
        if line.startswith("#"):
            continue
        m = _DEF.match(raw)
        if not m:
            continue
        rhs = _DEAD.sub("", m["rhs"]).strip()
        sub = re.match(r"^([A-Za-z_]\w*)\[(\d+)\]$", rhs)
        call = re.match(r"^([\w.]+)\((.*)\)$", rhs)
        if sub:
            op, args = "getitem", [sub.group(1)]
        elif call:
            op = call.group(1)
            args = [a for a in _split_top(call.group(2)) if re.fullmatch(r"[A-Za-z_]\w*", a)]
            if _split_top(call.group(2))[:1] != args[:1]:
                args = [""] + args  # the first argument is not a name
        else:
            op, args = rhs, ([rhs] if re.fullmatch(r"[A-Za-z_]\w*", rhs) else [])
        nodes[m["name"]] = Node(m["name"], m["ann"] or "", op, args, i)
    return nodes


def _defined(lines: list[str]) -> list[str | None]:
    """Per line, the node it defines (inputs one per line after ``normalise``), else None."""
    out: list[str | None] = []
    in_sig = False
    for line in lines:
        s = line.strip()
        if s.startswith("def ") and s.endswith("("):
            in_sig = True
            out.append(None)
            continue
        if in_sig:
            if s == "):":
                in_sig = False
                out.append(None)
                continue
            name = s.split(":")[0].rstrip(",").strip()
            out.append(name if name != "self" else None)
            continue
        m = _DEF.match(line) if not s.startswith("#") else None
        out.append(m["name"] if m else None)
    return out


def _rename(line: str, mapping: dict[str, str]) -> str:
    if line.lstrip().startswith("#") or not mapping:
        return line
    return _IDENT.sub(lambda m: mapping.get(m.group(1), m.group(1)), line)


def _key(line: str, names: set[str]) -> str:
    if line.lstrip().startswith("#"):
        return line
    return _IDENT.sub(lambda m: stem(m.group(1)) if m.group(1) in names else m.group(1), line)


def _coarse(line: str, name: str | None, nodes: set[str], show) -> str:
    """A node's line reduced to name stem, annotation, op and its operands as ``show`` renders
    them (the matched name, or ``?`` for an operand not matched yet)."""
    m = _DEF.match(line) if name else None
    if not m:
        return "\0" + line  # only nodes are matched coarsely
    rhs = m["rhs"]
    head = re.match(r"[\w.]*", rhs).group(0)
    op = head.rsplit(".", 1)[-1] if "(" in rhs else head
    operands = [show(t) for t in _IDENT.findall(rhs[len(head):] if "(" in rhs else rhs) if t in nodes]
    if "(" in rhs and "." in head and head.split(".", 1)[0] in nodes:  # a method call: x.view(...)
        operands.insert(0, show(head.split(".", 1)[0]))
    return f"{stem(name)}|{m['ann']}|{op}|{','.join(operands)}"


def align(before: list[str], after: list[str], *, seed: dict[str, str] | None = None,
          reserved: set[str] | frozenset = frozenset()) -> tuple[list[str], dict[str, str]]:
    """``after`` with its node names changed to those of the matching nodes in ``before``.

    ``seed`` fixes names in advance (a backward graph's inputs carry the names its forward
    showed); an unmatched node never takes a name of ``before`` or of ``reserved``. Returns the
    renamed lines and the mapping (name in ``after`` -> name shown).
    """
    def_a, def_b = _defined(before), _defined(after)
    names_a = {n for n in def_a if n}
    names_b = {n for n in def_b if n}
    keys_a = [_key(l, names_a) for l in before]
    keys_b = [_key(l, names_b) for l in after]
    mapping: dict[str, str] = {k: v for k, v in (seed or {}).items() if k in names_b}
    targets = set(mapping.values())

    def pair(i: int, j: int) -> None:
        a, b = def_a[i], def_b[j]
        if a and b and b not in mapping and a not in targets:
            mapping[b] = a
            targets.add(a)

    opcodes = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                pair(i, j)
    # A node whose operand the pass replaced keeps its identity: within a changed block, match
    # on stem, annotation, op and the operands matched so far.
    for tag, i1, i2, j1, j2 in opcodes:
        if tag != "replace":
            continue
        coarse_a = [_coarse(before[i], def_a[i], names_a, lambda t: t if t in targets else "?")
                    for i in range(i1, i2)]
        coarse_b = [_coarse(after[j], def_b[j], names_b, lambda t: mapping.get(t, "?"))
                    for j in range(j1, j2)]
        inner = difflib.SequenceMatcher(None, coarse_a, coarse_b, autojunk=False)
        for blk in inner.get_matching_blocks():
            for k in range(blk.size):
                pair(i1 + blk.a + k, j1 + blk.b + k)
    taken = names_a | set(reserved) | targets
    counters: dict[str, set[int]] = {}
    for n in taken:
        m = _STEM.match(n)
        counters.setdefault(m.group(1) or n, set()).add(int(m.group(2) or 0))
    for name in [n for n in def_b if n]:
        if name in mapping:
            continue
        if name not in taken:
            mapping[name] = name
        else:
            base = stem(name)
            used = counters.setdefault(base, set())
            k = max(used | {0}) + 1
            mapping[name] = f"{base}_{k}"
        taken.add(mapping[name])
        m = _STEM.match(mapping[name])
        counters.setdefault(m.group(1) or name, set()).add(int(m.group(2) or 0))
    renamed = [_rename(l, {k: v for k, v in mapping.items() if k != v}) for l in after]
    return renamed, mapping


def unified(before: list[str], after: list[str], *, label_before: str, label_after: str,
            context: int = 3, marks_before: dict[str, str] | None = None,
            marks_after: dict[str, str] | None = None) -> list[str]:
    """A unified diff of two normalised, aligned graphs. A line defining a node named in
    ``marks_before`` / ``marks_after`` (name -> note) gets ``  # prac: note`` appended."""

    def mark(lines, marks):
        return [f"{line}  # prac: {marks[name]}" if name in marks else line
                for line, name in zip(lines, _defined(lines))]

    return list(difflib.unified_diff(mark(before, marks_before or {}), mark(after, marks_after or {}),
                                     fromfile=label_before, tofile=label_after, lineterm="",
                                     n=context))
