// An OpenVINO extension: the op edgeattn::MaskedAttention, computed by the fused kernel (attention.hpp), and the
// ONNX frontend conversions that turn a file's edgeattn.MaskedAttention_* nodes (dense and blocked tables) into
// it.  Load it with core.add_extension(path) (Python) or ov::Core::add_extension(path) (C++) before reading the
// file.  The op computes in float32: fp16 and bf16 nodes get Convert nodes around it.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/convert.hpp>
#include <openvino/op/op.hpp>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attention.hpp"

namespace edgeattn {

// The kernel's threads: OpenVINO's own pool (TBB), the one its CPU plugin runs every other node on.
void on_openvino_threads(const std::function<void(int, int)>& body) { ov::parallel_nt(0, body); }

class MaskedAttention : public ov::op::Op {
public:
    OPENVINO_OP("MaskedAttention", "edgeattn");

    MaskedAttention() = default;
    MaskedAttention(const ov::OutputVector& args, std::string layout, float scale, float softcap)
        : Op(args), m_layout(std::move(layout)), m_scale(scale), m_softcap(softcap) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        const size_t tables = m_layout == "blocked" ? 5 : 1;  // without the optional bias
        NODE_VALIDATION_CHECK(this, m_layout == "blocked" || m_layout == "dense",
                              "edgeattn::MaskedAttention computes dense and blocked tables, not ", m_layout);
        NODE_VALIDATION_CHECK(this, get_input_size() == 3 + tables || get_input_size() == 4 + tables,
                              "edgeattn::MaskedAttention (", m_layout, ") takes q, k, v, ", tables,
                              " table inputs and an optional bias, got ", get_input_size(), " inputs");
        for (size_t i = 0; i < 3; ++i)
            NODE_VALIDATION_CHECK(this, get_input_element_type(i) == ov::element::f32,
                                  "edgeattn::MaskedAttention computes in f32, input ", i, " is ",
                                  get_input_element_type(i));
        // the bank, or the dense mask, read as bytes: boolean in the file, u8 once the CPU plugin has converted it
        const size_t mask = m_layout == "blocked" ? 6 : 3;
        const auto mask_type = get_input_element_type(mask);
        NODE_VALIDATION_CHECK(this, mask_type == ov::element::boolean || mask_type == ov::element::u8,
                              "edgeattn::MaskedAttention takes a boolean mask, input ", mask, " is ", mask_type);
        // (B, H, rows, Dv): q's rows, or a block table's q_pos count (a bucket of a bucketed table has fewer)
        ov::PartialShape out = get_input_partial_shape(0);
        const ov::PartialShape& v = get_input_partial_shape(2);
        if (out.rank().is_static() && v.rank().is_static() && out.rank().get_length() == 4 &&
            v.rank().get_length() == 4) {
            out[3] = v[3];
            if (m_layout == "blocked") out[2] = get_input_partial_shape(5)[0];
        }
        set_output_type(0, ov::element::f32, out);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<MaskedAttention>(args, m_layout, m_scale, m_softcap);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("layout", m_layout);
        visitor.on_attribute("scale", m_scale);
        visitor.on_attribute("softcap", m_softcap);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape& qs = inputs[0].get_shape();
        const ov::Shape& ks = inputs[1].get_shape();
        const ov::Shape& vs = inputs[2].get_shape();
        OPENVINO_ASSERT(qs.size() == 4 && ks.size() == 4 && vs.size() == 4,
                        "edgeattn::MaskedAttention takes (B, H, N, D) q, k and v");
        const bool blocked = m_layout == "blocked";
        if (blocked) check_block_table(inputs);
        const size_t rows = blocked ? inputs[5].get_shape()[0] : qs[2];
        outputs[0].set_shape({qs[0], qs[1], rows, vs[3]});
        const auto dim = [](size_t d) { return static_cast<int64_t>(d); };
        Qkv x{inputs[0].data<const float>(),
              inputs[1].data<const float>(),
              inputs[2].data<const float>(),
              outputs[0].data<float>(),
              dim(qs[0]), dim(qs[1]), dim(ks[1]), dim(qs[2]), dim(ks[2]), dim(qs[3]), dim(vs[3]),
              m_scale, m_softcap};
        int rc = 0;
        if (blocked) {
            const ov::Shape &q_index = inputs[3].get_shape(), &kv_index = inputs[4].get_shape();
            const ov::Shape& bank = inputs[6].get_shape();
            const bool bias = inputs.size() > 8;
            std::vector<int64_t> copies[4];
            Blocked t{index(inputs[3], copies[0]), index(inputs[4], copies[1]), index(inputs[5], copies[2]),
                      reinterpret_cast<const uint8_t*>(inputs[6].data()), index(inputs[7], copies[3]),
                      bias ? inputs[8].data<const float>() : nullptr,
                      dim(q_index[0]), dim(q_index[1]), dim(kv_index[1]), dim(bank[0]), dim(bank[1]),
                      bias ? dim(inputs[8].get_shape()[1]) : 1, dim(rows)};
            const auto add = additive(t, inputs[6].data(), bias ? inputs[8].data() : nullptr);
            t.add = add->empty() ? nullptr : add->data();
            rc = blocked_attention(x, t, on_openvino_threads);
        } else {
            const bool bias = inputs.size() > 4;
            const auto [mb, mh] = batch_and_heads(inputs[3].get_shape(), qs[2], ks[2]);
            const auto [bb, bh] = bias ? batch_and_heads(inputs[4].get_shape(), qs[2], ks[2]) : std::pair<int64_t, int64_t>{1, 1};
            Dense t{reinterpret_cast<const uint8_t*>(inputs[3].data()), bias ? inputs[4].data<const float>() : nullptr,
                    mh, bh, mb, bb};
            rc = dense_attention(x, t, on_openvino_threads);
        }
        OPENVINO_ASSERT(rc == 0, "edgeattn::MaskedAttention: ",
                        rc == 2 ? "a table index is out of range for these inputs"
                                : "q's heads are not a multiple of k's, or a table has neither 1 nor q's heads "
                                  "(or batch)");
        return true;
    }

private:
    // q_index (T, tq), kv_index (T, K), q_pos (M), bank (P, mh, tq, K), block (T), bias (P, bh, tq, K): checked
    // before any of them is read.
    static void check_block_table(const ov::TensorVector& inputs) {
        const ov::Shape &q_index = inputs[3].get_shape(), &kv_index = inputs[4].get_shape();
        const ov::Shape& bank = inputs[6].get_shape();
        const auto fits = [&](const ov::Shape& table) {
            return table.size() == 4 && table[0] == bank[0] && table[2] == q_index[1] && table[3] == kv_index[1];
        };
        OPENVINO_ASSERT(q_index.size() == 2 && kv_index.size() == 2 && kv_index[0] == q_index[0] &&
                            inputs[5].get_shape().size() == 1 && fits(bank) &&
                            inputs[7].get_shape() == ov::Shape{q_index[0]} &&
                            (inputs.size() <= 8 || fits(inputs[8].get_shape())),
                        "edgeattn::MaskedAttention: the block table's shapes do not fit together");
    }

    // A dense mask's or bias's (batch, heads): (Nq, Nk), (heads, Nq, Nk) or (batch, heads, Nq, Nk).
    static std::pair<int64_t, int64_t> batch_and_heads(const ov::Shape& s, size_t nq, size_t nk) {
        OPENVINO_ASSERT(s.size() >= 2 && s.size() <= 4 && s[s.size() - 2] == nq && s[s.size() - 1] == nk,
                        "edgeattn::MaskedAttention: a dense table is (Nq, Nk), (heads, Nq, Nk) or (batch, heads, Nq, "
                        "Nk) with Nq = ", nq, " and Nk = ", nk, ", got ", s);
        return {s.size() == 4 ? static_cast<int64_t>(s[0]) : 1, s.size() >= 3 ? static_cast<int64_t>(s[s.size() - 3]) : 1};
    }

    // The table's additive form (additive_table), built on the first run and kept while the bank and bias stay
    // where they are: they are the model's constants, so it is built once.
    // The caller holds the returned pointer while it runs, so a concurrent rebuild cannot free it.
    std::shared_ptr<const std::vector<float>> additive(const Blocked& t, const void* bank, const void* bias) const {
        std::lock_guard<std::mutex> lock(m_mutex);
        if (bank != m_bank || bias != m_bias || !m_add) {
            m_add = std::make_shared<const std::vector<float>>(additive_table(t));
            m_bank = bank;
            m_bias = bias;
        }
        return m_add;
    }

    mutable std::mutex m_mutex;
    mutable std::shared_ptr<const std::vector<float>> m_add;
    mutable const void* m_bank = nullptr;
    mutable const void* m_bias = nullptr;

    // The file's int64 indices, which the CPU plugin may hand over as int32 (it computes integers in 32 bits).
    static const int64_t* index(const ov::Tensor& t, std::vector<int64_t>& copy) {
        if (t.get_element_type() == ov::element::i64) return t.data<const int64_t>();
        OPENVINO_ASSERT(t.get_element_type() == ov::element::i32, "edgeattn::MaskedAttention takes integer indices");
        const int32_t* data = t.data<const int32_t>();
        copy.assign(data, data + t.get_size());
        return copy.data();
    }

    std::string m_layout = "blocked";
    float m_scale = 1.0f;
    float m_softcap = 0.0f;
};

namespace {

// An edgeattn.MaskedAttention_* node -> MaskedAttention in f32, with Converts around it for fp16/bf16 nodes.
ov::OutputVector convert(const ov::frontend::NodeContext& node) {
    const auto layout = node.get_attribute<std::string>("layout");
    const auto scale = node.get_attribute<float>("scale");
    const auto softcap = node.get_attribute<float>("softcap", 0.0f);
    const auto type = node.get_input(0).get_element_type();
    ov::OutputVector args;
    for (size_t i = 0; i < node.get_input_size(); ++i) {
        ov::Output<ov::Node> in = node.get_input(static_cast<int>(i));
        if (std::string(in.get_node()->get_type_name()) == "NullNode") continue;  // an absent optional input
        const auto et = in.get_element_type();
        if (et.is_real() && et != ov::element::f32) in = std::make_shared<ov::op::v0::Convert>(in, ov::element::f32);
        args.push_back(in);
    }
    ov::Output<ov::Node> out = std::make_shared<MaskedAttention>(args, layout, scale, softcap)->output(0);
    if (type != ov::element::f32) out = std::make_shared<ov::op::v0::Convert>(out, type);
    return {out};
}

std::vector<ov::Extension::Ptr> extensions() {
    std::vector<ov::Extension::Ptr> all{std::make_shared<ov::OpExtension<MaskedAttention>>()};
    // every op type of a dense- or blocked-table node: MaskedAttention_<lowering>[_softcap][_bias]
    for (const char* lowering : {"dense", "blocked", "attention", "contrib"})
        for (const char* cap : {"", "_softcap"})
            for (const char* bias : {"", "_bias"}) {
                const std::string op = std::string("MaskedAttention_") + lowering + cap + bias;
                all.push_back(std::make_shared<ov::frontend::onnx::ConversionExtension>(op, "edgeattn", convert));
            }
    return all;
}

}  // namespace
}  // namespace edgeattn

OPENVINO_CREATE_EXTENSIONS(edgeattn::extensions());
