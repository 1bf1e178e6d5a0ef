"""Normalising and aligning printed graphs: no compilation, pure text."""
from prac_fx.diff import graph_text

BEFORE = '''class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[4, 8]", primals_2: "f32[8, 8]"):
        # File: /home/someone/site-packages/pkg/model.py:12 in forward, code: y = self.lin(x)
        permute: "f32[8, 8]" = torch.ops.aten.permute.default(primals_2, [1, 0]);  primals_2 = None
        mm: "f32[4, 8]" = torch.ops.aten.mm.default(primals_1, permute);  permute = None
        relu: "f32[4, 8]" = torch.ops.aten.relu.default(mm);  mm = None
        mm_1: "f32[4, 8]" = torch.ops.aten.mm.default(relu, relu)
        return (mm_1, primals_1, relu)
'''

# The same graph with one node inserted: every later counter moves.
AFTER = '''class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[4, 8]", primals_2: "f32[8, 8]", primals_3: "f32[8, 2]"):
        # File: /opt/other/path/pkg/model.py:12 in forward, code: y = self.lin(x)
        mm: "f32[4, 2]" = torch.ops.aten.mm.default(primals_1, primals_3)
        permute: "f32[8, 8]" = torch.ops.aten.permute.default(primals_2, [1, 0]);  primals_2 = None
        mm_1: "f32[4, 8]" = torch.ops.aten.mm.default(primals_1, permute);  permute = None
        relu: "f32[4, 8]" = torch.ops.aten.relu.default(mm_1);  mm_1 = None
        mm_2: "f32[4, 8]" = torch.ops.aten.mm.default(relu, relu)
        return (mm_2, mm, relu)
'''


def test_normalise_removes_run_and_machine_specific_text():
    code = ('    # File: /a/b/c/modeling.py:7 in f, code: x = 1 <eval_with_key>.42 at 0x7f3a2b1c9d80 '
            '0f1e2d3c-1234-5678-9abc-def012345678\n'
            '    buf12 = empty(); buf7 = buf12\n'
            '    y: "f32[2]" = foo(x);  x = z = None\n')
    lines = graph_text.normalise(code)
    assert lines[0] == "    # File: modeling.py:7 in f, code: x = 1 <eval_with_key> at 0x? <uuid>"
    assert lines[1] == "    buf0 = empty(); buf1 = buf0"
    assert lines[2] == '    y: "f32[2]" = foo(x)'


def test_signature_and_return_one_item_a_line():
    lines = graph_text.normalise(BEFORE)
    assert lines[1:5] == ["    def forward(", "        self,", '        primals_1: "f32[4, 8]",',
                          '        primals_2: "f32[8, 8]",']
    assert lines[-5:] == ["        return (", "            mm_1,", "            primals_1,",
                          "            relu,", "        )"]


def test_align_keeps_names_of_matching_nodes():
    before, after = graph_text.normalise(BEFORE), graph_text.normalise(AFTER)
    renamed, mapping = graph_text.align(before, after)
    assert mapping["mm_1"] == "mm" and mapping["mm_2"] == "mm_1" and mapping["relu"] == "relu"
    assert mapping["mm"] not in {"mm", "mm_1"}  # the inserted node takes a fresh name
    diff = graph_text.unified(before, renamed, label_before="a", label_after="b", context=0)
    changed = [l for l in diff[2:] if l[:1] in "+-"]
    # Only the new input, the new node and the changed output remain.
    assert changed == [
        '+        primals_3: "f32[8, 2]",',
        f'+        {mapping["mm"]}: "f32[4, 2]" = torch.ops.aten.mm.default(primals_1, primals_3)',
        "-            primals_1,",
        f"+            {mapping['mm']},",
    ]


def test_align_seed_and_reserved_names():
    before, after = graph_text.normalise(BEFORE), graph_text.normalise(AFTER)
    _, mapping = graph_text.align(before, after, seed={"mm": "compressed"}, reserved={"mm_5"})
    assert mapping["mm"] == "compressed"
    assert "mm_5" not in mapping.values()


def test_marks_and_determinism():
    before, after = graph_text.normalise(BEFORE), graph_text.normalise(AFTER)
    renamed, mapping = graph_text.align(before, after)
    new = mapping["mm"]
    runs = [graph_text.unified(before, renamed, label_before="a", label_after="b",
                               marks_after={new: "x @ P"}) for _ in range(2)]
    assert runs[0] == runs[1]
    assert any(l.startswith("+") and l.endswith("# prac: x @ P") for l in runs[0])


def test_parse_nodes():
    nodes = graph_text.parse(BEFORE)
    assert nodes["primals_1"].op == "input" and nodes["primals_1"].shape == [4, 8]
    assert nodes["permute"].op == "torch.ops.aten.permute.default"
    assert nodes["permute"].first_arg == "primals_2"
    assert nodes["mm_1"].args == ["relu", "relu"]
    assert nodes["relu"].dtype == "f32"
