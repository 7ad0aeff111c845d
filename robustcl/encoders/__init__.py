"""Bring your own encoder: robustcl's phase 2 (SLF/ALF/AFF), attacks and integrity checks on any encoder.

An encoder is an nn.Module mapping images in [0, 1], shape (N, C, H, W), to features (N, D); it
does its own input normalisation, as robustcl's encoders do. Three ways to give one:
- a robustcl encoder.safetensors (or a run directory): its normalisation and BN branches come with it;
- a published checkpoint of any layout in encoders/layouts.py (ACL family, DynACL, DynACL++/LP-AFT, AdvCL and
  A-InfoNCE, DeACL, RoCL, the seed paper's code, torchvision ResNet-18/50), whatever its file name, read with
  torch.load(weights_only=True) (or a .safetensors without robustcl metadata): the layout is detected from
  its keys and read strictly (encoders/published.py); its normalisation, BN copies and stem come with the
  layout (a torchvision file without normalize.* buffers takes `mean`/`std`, default the evaluation
  dataset's channel statistics), and its features are L2-normalised as robustcl's encoders give;
- a module (`evaluate_encoder(module)`) or "package.module:callable" naming one, an nn.Module subclass or a
  Python function with no required parameters that builds one (the rule: robustcl/encoders/load.py); its
  features are used as it returns them.
Non-finite weights, or non-finite features on a first batch, are an error for every kind.
The results directory is a run directory (config.yaml, heads/, results.json, report.md, metrics.jsonl)
plus encoder.json saying what was evaluated; for the first two kinds it also holds encoder.safetensors,
so `robustcl evaluate --run DIR` can add attacks later without refitting.
"""
from robustcl.encoders.evaluate import PROTOCOL_PRESETS, default_out, encoder_config, evaluate_encoder
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.layouts import LAYOUTS
from robustcl.encoders.load import ModuleEncoder, fingerprint, load_external
from robustcl.encoders.published import Reading, read_published

__all__ = ["EncoderError", "LAYOUTS", "ModuleEncoder", "PROTOCOL_PRESETS", "Reading", "default_out", "encoder_config",
           "evaluate_encoder", "fingerprint", "load_external", "read_published"]
