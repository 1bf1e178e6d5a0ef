"""The names the passes, the report and the diff tool share, defined once.

A ``Site`` has a ``kind`` (what the node computes), a ``status`` (where the passes left it) and,
when skipped, a ``reason``. The rewrite tags every node it inserts with ``node.meta[TAG]``, a
dict with ``role`` (one of ``ROLES``), ``group`` (the group's index in the graph) and, on a
rewritten site, ``kind``; readers of a rewritten graph find the PRAC nodes by that tag rather
than by their printed names.
"""

# -- kinds ----------------------------------------------------------------------------------------
LINEAR = "linear"  # F.linear / torch._C._nn.linear, weight (m, n)
ADDMM = "addmm"  # torch.addmm(bias, x, W), weight (n, m): GPT-2's Conv1D
MATMUL = "matmul"  # x @ W, weight (n, m)
LINEAR_KINDS = (LINEAR, ADDMM, MATMUL)
ATTENTION = "attention"
NONLINEAR = "nonlinear"
UNSUPPORTED = "unsupported"  # a linear-like node in a form the rewrite does not handle
KINDS = LINEAR_KINDS + (ATTENTION, NONLINEAR, UNSUPPORTED)

# -- statuses: find_sites leaves a site SKIPPED or CANDIDATE, rewrite_sites makes a candidate
# REWRITTEN ------------------------------------------------------------------------------------
SKIPPED = "skipped"
CANDIDATE = "candidate"
REWRITTEN = "rewritten"
STATUSES = (SKIPPED, CANDIDATE, REWRITTEN)

# -- why a site is skipped ------------------------------------------------------------------------
REASON_ATTENTION = "attention"
REASON_NONLINEAR = "nonlinear"
NO_TRAINABLE_WEIGHT = "no trainable weight"
OUTPUT_HEAD = "output head"
FILTERED = "filtered"
TOO_NARROW = "too narrow for the rank"
TOO_FEW_ROWS = "too few rows to gain"
UNSUPPORTED_PATTERN = "unsupported pattern"
# a linear site inside an activation-checkpointed region: nothing of it is saved to compress
CHECKPOINTED = "inside activation checkpoint: recomputed, nothing saved to compress"
SELECTIVE = ("inside selective activation checkpoint: its policy decides what is saved; "
             "not compressed")
# Dynamo's graph break out of an activation checkpoint whose forward has a side effect
# (transformers' attention layers set a context variable): the region ran uncompiled, outside
# any graph, so its linear layers reach no site list (``torch_seam.graph_breaks`` keys it so)
CHECKPOINT_BREAK = "side effect inside an activation checkpoint"
CHECKPOINT_UNCOMPILED = "the checkpointed layers ran uncompiled, nothing compressed in them"
# what lifts it: Dynamo traces the region and does not replay the side effect in the recompute
CHECKPOINT_REMEDY = ("run the compiled calls inside `with prac_fx.allow_checkpoint_side_effects():` "
                     "(Dynamo then traces the checkpoint; the side effect, e.g. a context "
                     "variable set in the forward, is not replayed when the backward recomputes "
                     "the region; README, 'Compatibility')")
# a site whose input the partitioned graph keeps for another op's backward anyway (the attention
# output under an output projection): a compressed copy would save nothing (``exact_if_kept``)
KEPT_ANYWAY = "input kept for backward anyway: compressing saves nothing"
REASONS = (REASON_ATTENTION, REASON_NONLINEAR, NO_TRAINABLE_WEIGHT, OUTPUT_HEAD, FILTERED,
           TOO_NARROW, TOO_FEW_ROWS, UNSUPPORTED_PATTERN, CHECKPOINTED, SELECTIVE, KEPT_ANYWAY)

# -- the tag on inserted nodes --------------------------------------------------------------------
TAG = "prac"
ROLE_BASIS = "basis"  # the placeholder of a group's basis P, (n, r1 + r2) float32
ROLE_COMPRESS = "compress"  # x_compressed = x2d @ P, (N, r)
ROLE_SITE = "site"  # ops.compressed_linear in place of the original op
ROLE_OMEGA = "omega"  # the placeholder of a following group's random draw, (n, r2) float32
ROLE_FOLLOW = "follow"  # follow_basis: a following group's basis built in the graph
ROLE_STATS = "stats"  # the placeholder whose gradient receives the running statistics
ROLE_STATS_ROW = "stats row"  # stats[i], one rewritten site's row
ROLE_HEAD_LOSS = "head loss"  # the chunked head + cross-entropy op and what reads its outputs
ROLE_SEEDS = "seeds"  # the placeholder of the quantized groups' rounding seeds, (groups, 2) int64
ROLE_SEED_ROW = "seed row"  # seeds[i], one quantized group's pair
ROLE_PART = "copy part"  # one tensor of a quantized copy (principal part, codes, scales)
ROLES = (ROLE_BASIS, ROLE_COMPRESS, ROLE_SITE, ROLE_OMEGA, ROLE_FOLLOW, ROLE_STATS, ROLE_STATS_ROW,
         ROLE_HEAD_LOSS, ROLE_SEEDS, ROLE_SEED_ROW, ROLE_PART)
INPUT_ROLES = (ROLE_BASIS, ROLE_OMEGA, ROLE_STATS, ROLE_SEEDS)  # the placeholders the rewrite appends, in order
