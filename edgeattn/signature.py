"""The ``edgeattn.MaskedAttention`` node's identity: its domain, op name, versions, inputs and attributes, and the
declared decisions.  The torch op (:mod:`edgeattn.attention`, :mod:`edgeattn.decisions`) emits these names while
tracing and the file format (:mod:`edgeattn.onnxfile`) reads and writes them, so they live below both and import
nothing."""

DOMAIN = "edgeattn"
OP = "MaskedAttention"
OP_VERSION = 3  # the newest node version, written only for files with softcapped nodes
OLDEST_OP_VERSION = 2  # the oldest one read
SOFTCAP_OP_VERSION = 3
# A declared hard decision (edgeattn.decisions.below) while tracing; export replaces each by a standard Less and
# lists the compared tensors under the ``decisions`` metadata, in the order the model makes them.
DECISION = "Decision"
# A declared selection (edgeattn.decisions.top_k): export replaces each by a standard TopK and lists it likewise.
DECISION_TOP_K = "DecisionTopK"

QKV = ("q", "k", "v")
# What each table layout passes after q, k, v (see edgeattn.tables); the optional bias is always last
TABLE_INPUTS = {
    "dense": ("mask", "bias"),
    "blocked": ("q_index", "kv_index", "q_pos", "bank", "block", "bank_bias"),
    # content-routed blocks (MoBA): ``blocks`` (B, H, N, S) int64, computed in the graph, the key blocks
    # each query attends in full (-1: none; distinct, never the query's own block); ``local`` (Bk, Bk)
    # bool, static: which keys of its own block a query attends (Bk = block size, Bk divides N; the
    # diagonal True)
    "routed": ("blocks", "local", "bias"),
}
# scale: softmax scale; mask: the mask's name; dtype: ONNX element type of q, so a body types its constants
# statically; layout: which TABLE_INPUTS follow q, k, v; lowering: the body; heads: q's head count (contrib's
# num_heads); softcap: scaled scores s become softcap * tanh(s / softcap) before bias and mask (absent or 0: no
# capping; set exactly on the nodes whose op type says softcap, see op_type)
ATTRIBUTES = ("scale", "mask", "dtype", "layout", "lowering", "heads", "softcap")
