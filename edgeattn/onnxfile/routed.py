"""Standard-op bodies for the ``routed`` layout: each query attends the keys of its own block that the static
``local`` table allows, plus every key of the blocks its ``blocks`` input lists (chosen in the graph, MoBA-style).

Shapes: q, k, v (B, H, N, D); ``local`` (Bk, Bk) bool, Bk the block size, N = nb * Bk, its diagonal True (a query
always attends itself); ``blocks`` (B, H, N, S) int64 block ids, -1 for none.  The ids of one query are distinct and
never its own block (edgeattn.routing makes them so).

``routed`` computes only what was chosen.  Every (query, chosen block) pair gets a slot in a per-(B, H) buffer where
the pairs are grouped by block, each group padded to whole tiles of Bk rows (see :func:`_slots`: one TopK sorts the
pairs, CumSums place them).  The groups hold at most N * S pairs and padding adds less than one tile per block, so
N * (S + 1) rows always suffice: a static shape.  Each tile is one batched MatMul of Bk queries against its block's
Bk keys and one Softmax; each pair's log-sum-exp and softmax-weighted values are gathered back and merged with the
own block's by their log-sum-exp, exactly a softmax over the union of the keys.  Softmax and merge are float32
whatever q's dtype.

``routed_dense`` expands the same choice to a (B, H, N, N) mask and runs the dense body: the reference lowering.
"""

from __future__ import annotations

from onnx import FunctionProto, TensorProto, helper

from .nodes import cast, dense_nodes, floats, function, ints, reduce, scaled_q

n = helper.make_node
LOWEST = -3.0e38  # a finite "minus infinity" for row maxima: exp(LOWEST - m) is 0 without inf - inf = NaN


def _zero_int():
    return helper.make_tensor("zero", TensorProto.INT64, [1], [0])


def _shapes() -> list:
    """bh (B, H), n_q (N,), bk (Bk,), nb (N / Bk,) and constants."""
    return [
        n("Shape", ["q"], ["bh"], start=0, end=2),
        n("Shape", ["q"], ["n_q"], start=2, end=3),
        n("Shape", ["local"], ["bk"], start=0, end=1),
        n("Div", ["n_q", "bk"], ["nb"]),
        ints("zero_i", 0),
        ints("one_1", [1]),
        ints("minus_one", [-1]),
    ]


def _routed_shapes() -> list:
    """d_q, d_v, s (S,), the shape of ``blocks``, g (B * H,) and its scalar."""
    return [
        n("Shape", ["q"], ["d_q"], start=3, end=4),
        n("Shape", ["v"], ["d_v"], start=3, end=4),
        n("Shape", ["blocks"], ["s"], start=3, end=4),
        n("Shape", ["blocks"], ["blocks_shape"]),
        n("ReduceProd", ["bh"], ["g"], keepdims=1),
        n("Squeeze", ["g"], ["g_s"]),
    ]


def _selection(opset: int) -> list:
    """``sel`` (B, H, N, nb) bool: where a query chose the block (one-hot per chosen block, any of them)."""
    return [
        n("Squeeze", ["nb"], ["nb_s"]),
        ints("one_i", 1),
        n("Range", ["zero_i", "nb_s", "one_i"], ["block_ids"]),
        n("Unsqueeze", ["blocks", "minus_one"], ["blocks_1"]),
        n("Equal", ["blocks_1", "block_ids"], ["hit"]),  # (B, H, N, S, nb); -1 hits nothing
        n("Cast", ["hit"], ["hit_i"], to=TensorProto.INT32),
        *reduce("ReduceMax", opset, "hit_i", "sel_i", 3, keepdims=0),
        n("Cast", ["sel_i"], ["sel"], to=TensorProto.BOOL),
    ]


def routed_dense(opset: int, name: str) -> FunctionProto:
    """The routed blocks and the own block's local table as one (B, H, N, N) mask, then the dense body.

    The reference lowering of the routed layout: all N^2 scores, the same choice of blocks."""
    nodes = (
        _shapes()
        + _selection(opset)
        + [
            n("Unsqueeze", ["sel", "minus_one"], ["sel_b1"]),
            n("Concat", ["bh", "n_q", "nb", "bk"], ["sel_keys_shape"], axis=0),
            n("Expand", ["sel_b1", "sel_keys_shape"], ["sel_keys"]),  # (B, H, N, nb, Bk)
            # shapes that repeat a dimension are Tiles: onnxslim 0.1.98 fails on a node that reads one tensor twice
            ints("two", [2]),
            n("Tile", ["n_q", "two"], ["n_n"]),
            n("Concat", ["bh", "n_n"], ["mask_shape"], axis=0),
            n("Reshape", ["sel_keys", "mask_shape"], ["chosen"]),
            # own = eye(nb) (x) local: (nb, Bk, nb, Bk) -> (N, N); static, runtimes fold it
            n("Tile", ["nb", "two"], ["nb_nb"]),
            n("ConstantOfShape", ["nb_nb"], ["zeros_nb"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
            n("EyeLike", ["zeros_nb"], ["eye_f"]),
            n("Cast", ["eye_f"], ["eye"], to=TensorProto.BOOL),
            n("Concat", ["nb", "one_1"], ["nb_one"], axis=0),
            n("Tile", ["nb_one", "two"], ["eye_shape"]),
            n("Reshape", ["eye", "eye_shape"], ["eye_4"]),
            n("Concat", ["one_1", "bk"], ["one_bk"], axis=0),
            n("Tile", ["one_bk", "two"], ["local_shape"]),
            n("Reshape", ["local", "local_shape"], ["local_4"]),
            n("And", ["eye_4", "local_4"], ["own_4"]),
            n("Reshape", ["own_4", "n_n"], ["own"]),
            n("Or", ["chosen", "own"], ["mask"]),
        ]
        + dense_nodes(opset, False, False)
    )
    return function(name, opset, nodes, routed_dense.__doc__)


def routed(opset: int, name: str) -> FunctionProto:
    """Queries grouped by the block they chose, one Bk x Bk MatMul per tile of a group, softmax statistics merged
    per query with its own block's: the work of the chosen blocks (see the module docstring)."""
    nodes = (
        _shapes()
        + _routed_shapes()
        + [*scaled_q(), floats("lowest", LOWEST), floats("zero_f", 0.0)]
        + _own(opset)
        + _slots(opset)
        + _tiles(opset)
        + _merge(opset)
    )
    return function(name, opset, nodes, routed.__doc__)


def _stats(opset: int, scores: str, values: str, prefix: str) -> list:
    """The log-sum-exp ``<prefix>_lse`` (float32, keepdims) and the softmax-weighted values ``<prefix>_o`` (float32)
    of ``scores`` (float32, -inf where masked, at least one key per row) over ``values``.  One Softmax, and the
    log-sum-exp from the row max m and the largest probability: lse = m - log(max p) (max p >= 1 / keys)."""
    return [
        n("Softmax", [scores], [f"{prefix}_p"], axis=-1),
        *reduce("ReduceMax", opset, scores, f"{prefix}_m", -1),
        *reduce("ReduceMax", opset, f"{prefix}_p", f"{prefix}_p_max", -1),
        n("Log", [f"{prefix}_p_max"], [f"{prefix}_log_p_max"]),
        n("Sub", [f"{prefix}_m", f"{prefix}_log_p_max"], [f"{prefix}_lse"]),
        cast(f"{prefix}_p", f"{prefix}_p_t"),
        n("MatMul", [f"{prefix}_p_t", values], [f"{prefix}_o_t"]),
        n("Cast", [f"{prefix}_o_t"], [f"{prefix}_o"], to=TensorProto.FLOAT),
    ]


def _own(opset: int) -> list:
    """Each block's queries against its own keys under ``local``: own_lse (B, H, N, 1), own_o (B, H, N, Dv)."""
    return [
        n("Concat", ["bh", "nb", "bk", "d_q"], ["blocks_q"], axis=0),
        n("Concat", ["bh", "nb", "bk", "d_v"], ["blocks_v"], axis=0),
        n("Reshape", ["q_scaled", "blocks_q"], ["q_own"]),  # (B, H, nb, Bk, D)
        n("Reshape", ["k", "blocks_q"], ["k_own"]),
        n("Reshape", ["v", "blocks_v"], ["v_own"]),
        n("Transpose", ["k_own"], ["k_own_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q_own", "k_own_t"], ["own_scores_t"]),  # (B, H, nb, Bk, Bk)
        n("Cast", ["own_scores_t"], ["own_scores"], to=TensorProto.FLOAT),
        floats("neg_inf", float("-inf")),
        n("Where", ["local", "zero_f", "neg_inf"], ["local_add"]),
        n("Add", ["own_scores", "local_add"], ["own_masked"]),
        *_stats(opset, "own_masked", "v_own", "own_b"),
        n("Concat", ["bh", "n_q", "one_1"], ["rows_1"], axis=0),
        n("Concat", ["bh", "n_q", "d_v"], ["rows_v"], axis=0),
        n("Reshape", ["own_b_lse", "rows_1"], ["own_lse"]),
        n("Reshape", ["own_b_o", "rows_v"], ["own_o"]),
    ]


def _slots(opset: int) -> list:
    """Where each (query, chosen block) pair goes, in O(N * S): ``slot`` (B, H, N, S) in a group's rows [0, rows),
    ``slot_query`` (G * rows,), the flat query row each slot reads, and ``tile_block`` (G, tiles), the block of each
    tile of Bk rows (padding slots and tiles read row 0 and block 0: computed, unused).

    One TopK sorts the pairs by the key ``block * N + query`` (pairs without a block last).  In that order a
    block's pairs are consecutive: a pair's rank in its group is its position minus its group's first position,
    and the group starts after the rows of the groups before it, each rounded up to whole tiles (an exclusive
    CumSum of those sizes, entered at each group's last pair).  Scatters here write distinct slots (only the
    spare last slot, which nothing reads, is written twice): no Scatter reduction, which onnx2tf cannot convert."""
    return [
        ints("one_i", 1),
        n("GreaterOrEqual", ["blocks", "zero_i"], ["valid"]),
        n("Max", ["blocks", "zero_i"], ["blk"]),
        n("Concat", ["g", "minus_one"], ["pairs_shape"], axis=0),
        n("Reshape", ["blk", "pairs_shape"], ["pair_block"]),  # (G, P), P = N * S
        n("Reshape", ["valid", "pairs_shape"], ["pair_valid"]),
        # sort the pairs by (block, query)
        n("Mul", ["n_q", "s"], ["p"]),
        n("Squeeze", ["p"], ["p_s"]),
        n("Range", ["zero_i", "p_s", "one_i"], ["pair_ids"]),  # (P,)
        n("Div", ["pair_ids", "s"], ["pair_query_id"]),  # the query of pair p: p // S
        n("Mul", ["pair_block", "n_q"], ["block_base_key"]),
        n("Add", ["block_base_key", "pair_query_id"], ["valid_key"]),
        n("Mul", ["nb", "n_q"], ["none_base"]),
        n("Add", ["none_base", "pair_query_id"], ["none_key"]),
        n("Where", ["pair_valid", "valid_key", "none_key"], ["sort_key"]),
        n("TopK", ["sort_key", "p"], ["sorted_key", "order"], axis=1, largest=0, sorted=1),
        n("Div", ["sorted_key", "n_q"], ["sorted_block"]),  # nb for pairs without a block
        n("Mod", ["sorted_key", "n_q"], ["sorted_query"]),
        n("Less", ["sorted_block", "nb"], ["sorted_valid"]),
        # where each group starts and ends in sorted order
        n("Sub", ["p", "one_1"], ["p_less"]),
        ints("axis_1", [1]),
        ints("zero_i_1", [0]),
        n("Slice", ["sorted_block", "zero_i_1", "p_less", "axis_1"], ["block_before_raw"]),
        n("Slice", ["sorted_block", "one_1", "p", "axis_1"], ["block_after_raw"]),
        n("Concat", ["g", "one_1"], ["g_col"], axis=0),
        n("ConstantOfShape", ["g_col"], ["no_block_col"], value=helper.make_tensor("m", TensorProto.INT64, [1], [-1])),
        n("Concat", ["no_block_col", "block_before_raw"], ["block_before"], axis=1),
        n("Concat", ["block_after_raw", "no_block_col"], ["block_after"], axis=1),
        n("Equal", ["sorted_block", "block_before"], ["same_before"]),
        n("Not", ["same_before"], ["group_starts"]),
        n("Equal", ["sorted_block", "block_after"], ["same_after"]),
        n("Not", ["same_after"], ["group_ends"]),
        n("Cast", ["group_starts"], ["group_starts_i"], to=TensorProto.INT64),
        n("CumSum", ["group_starts_i", "one_i"], ["group_count"]),
        n("Sub", ["group_count", "one_1"], ["group_of"]),  # (G, P): the pair's group, 0, 1, ...
        n("Where", ["group_starts", "group_of", "p"], ["start_index"]),  # others write the spare last column
        n("Add", ["p", "one_1"], ["p_spare"]),
        n("Concat", ["g", "p_spare"], ["g_p_spare"], axis=0),
        n("ConstantOfShape", ["g_p_spare"], ["no_start"], value=_zero_int()),
        n("Shape", ["sorted_key"], ["pairs_2d"]),
        n("Expand", ["pair_ids", "pairs_2d"], ["pair_ids_2d"]),
        n("ScatterElements", ["no_start", "start_index", "pair_ids_2d"], ["group_first_pos"], axis=1),
        n("GatherElements", ["group_first_pos", "group_of"], ["first_pos"], axis=1),
        n("Sub", ["pair_ids", "first_pos"], ["rank"]),  # the pair's rank in its group
        # a group's rows: its pairs rounded up to whole tiles (Mod: OpenVINO 2026.4 folds (x / bk) * bk into x)
        n("Add", ["rank", "bk"], ["count_up"]),  # (rank + 1) + (bk - 1)
        n("Mod", ["count_up", "bk"], ["count_over"]),
        n("Sub", ["count_up", "count_over"], ["group_rows"]),
        n("Where", ["group_ends", "group_rows", "zero_i"], ["rows_at_end"]),
        n("CumSum", ["rows_at_end", "one_i"], ["group_start"], exclusive=1),
        n("Add", ["group_start", "rank"], ["sorted_slot"]),  # (G, P)
        # rows per group: N * (S + 1); one more slot at the end takes every pair without a block
        n("Add", ["s", "one_1"], ["s_1"]),
        n("Mul", ["n_q", "s_1"], ["rows"]),
        n("Add", ["rows", "one_1"], ["rows_dummy"]),
        n("Mul", ["nb", "s_1"], ["tiles"]),
        n("Where", ["sorted_valid", "sorted_slot", "rows"], ["sorted_slot_or_dummy"]),
        n("Range", ["zero_i", "g_s", "one_i"], ["group_ids"]),
        n("Reshape", ["group_ids", "g_col"], ["group_ids_2"]),  # (G, 1)
        n("Mul", ["group_ids_2", "n_q"], ["query_base"]),
        n("Add", ["query_base", "sorted_query"], ["sorted_query_row"]),
        n("Concat", ["g", "rows_dummy"], ["g_rows_dummy"], axis=0),
        n("ConstantOfShape", ["g_rows_dummy"], ["no_query"], value=_zero_int()),
        n("ScatterElements", ["no_query", "sorted_slot_or_dummy", "sorted_query_row"], ["slot_query_dummy"], axis=1),
        n("Slice", ["slot_query_dummy", "zero_i_1", "rows", "one_1"], ["slot_query_g"]),  # drop the spare slot
        n("Reshape", ["slot_query_g", "minus_one"], ["slot_query"]),
        # the block of each tile: the block its first slot was written for
        n("ScatterElements", ["no_query", "sorted_slot_or_dummy", "sorted_block"], ["slot_block_dummy"], axis=1),
        n("Slice", ["slot_block_dummy", "zero_i_1", "rows", "one_1"], ["slot_block"]),
        n("Concat", ["g", "tiles", "bk"], ["g_tiles_bk"], axis=0),
        n("Reshape", ["slot_block", "g_tiles_bk"], ["slot_block_3"]),
        ints("axis_2_1", [2]),
        n("Slice", ["slot_block_3", "zero_i_1", "one_1", "axis_2_1"], ["tile_first_block"]),
        n("Squeeze", ["tile_first_block", "axis_2_1"], ["tile_block"]),  # (G, tiles)
        # each pair's slot, in the pairs' own order
        n("ScatterElements", ["sort_key", "order", "sorted_slot"], ["pair_slot"], axis=1),  # order: a permutation
        n("Reshape", ["pair_slot", "blocks_shape"], ["slot"]),  # (B, H, N, S)
        ints("one_one", [1, 1]),  # not Concat(one_1, one_1): onnxslim 0.1.98 fails on a node reading one tensor twice
        n("Concat", ["bh", "one_one"], ["g_shape"], axis=0),
        n("Reshape", ["group_ids", "g_shape"], ["group_ids_4"]),  # (B, H, 1, 1)
    ]


def _tiles(opset: int) -> list:
    """Each tile of Bk slots against the Bk keys of its group's block: tile_lse_flat (G * rows,), tile_o_flat."""
    return [
        # Flatten, and no -1 in a Concat with a shape dimension below: onnxslim 0.1.98's constant folding breaks
        # its graph on such Concats (in moba-lm)
        n("Flatten", ["q_scaled"], ["q_rows"], axis=3),  # (G * N, D)
        n("Gather", ["q_rows", "slot_query"], ["q_slots"], axis=0),
        n("Concat", ["g", "tiles", "bk", "d_q"], ["tile_q_shape"], axis=0),
        n("Reshape", ["q_slots", "tile_q_shape"], ["q_tiles"]),  # (G, tiles, Bk, D)
        n("Mul", ["group_ids_2", "nb"], ["block_base"]),
        n("Add", ["block_base", "tile_block"], ["tile_key_block"]),
        n("Reshape", ["tile_key_block", "minus_one"], ["tile_key_block_flat"]),
        n("Mul", ["g", "nb"], ["all_blocks"]),
        n("Concat", ["all_blocks", "bk", "d_q"], ["key_blocks_shape"], axis=0),
        n("Concat", ["all_blocks", "bk", "d_v"], ["value_blocks_shape"], axis=0),
        n("Reshape", ["k", "key_blocks_shape"], ["k_blocks"]),  # (G * nb, Bk, D)
        n("Reshape", ["v", "value_blocks_shape"], ["v_blocks"]),
        n("Gather", ["k_blocks", "tile_key_block_flat"], ["k_tiles_flat"], axis=0),
        n("Gather", ["v_blocks", "tile_key_block_flat"], ["v_tiles_flat"], axis=0),
        n("Reshape", ["k_tiles_flat", "tile_q_shape"], ["k_tiles"]),  # (G, tiles, Bk, D)
        n("Concat", ["g", "tiles", "bk", "d_v"], ["tile_v_shape"], axis=0),
        n("Reshape", ["v_tiles_flat", "tile_v_shape"], ["v_tiles"]),
        n("Transpose", ["k_tiles"], ["k_tiles_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_tiles", "k_tiles_t"], ["tile_scores_t"]),  # (G, tiles, Bk, Bk)
        n("Cast", ["tile_scores_t"], ["tile_scores"], to=TensorProto.FLOAT),
        *_stats(opset, "tile_scores", "v_tiles", "tile"),
        n("Reshape", ["tile_lse", "minus_one"], ["tile_lse_flat"]),  # (G * rows,)
        n("Flatten", ["tile_o"], ["tile_o_flat"], axis=3),  # (G * rows, Dv)
    ]


def _merge(opset: int) -> list:
    """Gather each pair's statistics back and merge them with the own block's: one softmax over the union.  The
    largest part has weight 1, so the denominator is at least 1."""
    return [
        n("Sub", ["rows", "one_1"], ["last_row"]),
        n("Min", ["slot", "last_row"], ["slot_in"]),
        n("Mul", ["group_ids_4", "rows"], ["row_base"]),
        n("Add", ["row_base", "slot_in"], ["pair_row"]),  # (B, H, N, S)
        n("Gather", ["tile_lse_flat", "pair_row"], ["pair_lse_raw"], axis=0),
        n("Gather", ["tile_o_flat", "pair_row"], ["pair_o"], axis=0),  # (B, H, N, S, Dv)
        n("Where", ["valid", "pair_lse_raw", "lowest"], ["pair_lse"]),
        *reduce("ReduceMax", opset, "pair_lse", "pairs_max", -1),
        n("Max", ["own_lse", "pairs_max"], ["row_max"]),  # (B, H, N, 1)
        n("Sub", ["own_lse", "row_max"], ["own_shift"]),
        n("Exp", ["own_shift"], ["own_w"]),
        n("Sub", ["pair_lse", "row_max"], ["pair_shift"]),
        n("Exp", ["pair_shift"], ["pair_w_raw"]),
        n("Where", ["valid", "pair_w_raw", "zero_f"], ["pair_w"]),  # (B, H, N, S)
        *reduce("ReduceSum", opset, "pair_w", "pairs_w", -1),
        n("Add", ["own_w", "pairs_w"], ["denominator"]),
        n("Mul", ["own_o", "own_w"], ["own_part"]),
        n("Unsqueeze", ["pair_w", "minus_one"], ["pair_w_1"]),
        n("Mul", ["pair_o", "pair_w_1"], ["pair_part"]),
        *reduce("ReduceSum", opset, "pair_part", "pairs_part", 3, keepdims=0),
        n("Add", ["own_part", "pairs_part"], ["numerator"]),
        n("Div", ["numerator", "denominator"], ["merged"]),
        cast("merged", "out"),
    ]
