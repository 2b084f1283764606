"""An LM step as the stateful OpenVINO IR that OpenVINO GenAI's ``LLMPipeline`` runs (``openvino_model.xml`` in an
``export_lm`` folder), with the tokenizer and generation config the pipeline reads beside it.

The pipeline feeds ``input_ids``, ``attention_mask``, ``position_ids`` and ``beam_idx`` and keeps the caches itself:
each ``past_key_values.N.*`` input becomes a variable (ReadValue, zeros of the layer's cache shape at the start of a
generation, reordered by ``beam_idx`` as the pipeline's beam search expects) and the step's updated cache its Assign,
so a sliding layer's state stays a ring of its window and nothing leaves the runtime per token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import RuntimeUnavailable

IR = "openvino_model.xml"


def stateful(onnx_path: Path):
    """The ONNX file of a :class:`~edgeattn.convert.lm_step.StatefulStep` as a stateful ``openvino.Model``."""
    import openvino as ov
    from openvino import opset6
    from openvino import opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    model = ov.convert_model(str(onnx_path))
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    results = {o.get_any_name(): o.get_node() for o in model.outputs}
    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    batch = ops.gather(ops.shape_of(params["input_ids"]), ops.constant(np.array([0])), ops.constant(np.int64(0)))
    sinks = []
    for name, param in params.items():
        if not name.startswith("past_key_values."):
            continue
        info = VariableInfo()
        info.variable_id, info.data_type, info.data_shape = name, param.get_element_type(), param.get_partial_shape()
        variable = Variable(info)
        rest = [d.get_length() for d in list(param.get_partial_shape())[1:]]  # (kv_heads, slots, head_dim)
        zeros = ops.broadcast(ops.constant(np.float32(0)), ops.concat([batch, ops.constant(np.array(rest))], 0))
        state = ops.gather(opset6.read_value(zeros, variable), beam_idx, ops.constant(np.int64(0)))
        for consumer in list(param.output(0).get_target_inputs()):
            consumer.replace_source_output(state.output(0))
        result = results[name.replace("past_key_values", "present")]
        updated = result.input_value(0)
        # Assign takes a node: the producer itself when it has one output
        node = updated.get_node() if updated.get_node().get_output_size() == 1 else ops.convert(updated, ov.Type.f32)
        sinks.append(opset6.assign(node, variable))
        model.remove_result(result)
        model.remove_parameter(param)
    model.add_parameters([beam_idx])
    model.add_sinks(sinks)
    model.validate_nodes_and_infer_types()
    return model


def write(onnx_path: Path, folder: Path, generation: dict, tokenizer=None) -> None:
    """``openvino_model.xml``/``.bin``, ``generation_config.json`` and, given a transformers tokenizer, its files
    and its OpenVINO tokenizer and detokenizer IRs (openvino-tokenizers)."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("openvino_genai=True needs OpenVINO: pip install 'edgeattn[openvino]'") from None
    ov.save_model(stateful(onnx_path), str(folder / IR), compress_to_fp16=False)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is None:
        return
    try:
        from openvino_tokenizers import convert_tokenizer
    except ImportError:
        raise RuntimeUnavailable(
            "a tokenizer for OpenVINO GenAI is converted by openvino-tokenizers: pip install openvino-tokenizers"
        ) from None
    tokenizer.save_pretrained(str(folder))
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(folder / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(folder / "openvino_detokenizer.xml"))
