"""Bring your own encoder: robustcl's phase 2 (SLF/ALF/AFF), attacks and integrity checks on any encoder.

An encoder is an nn.Module mapping images in [0, 1], shape (N, C, H, W), to features (N, D); it
does its own input normalisation, as robustcl's encoders do. Three ways to give one:
- a robustcl encoder.safetensors (or a run directory): its normalisation and BN branches come with it;
- a torchvision-layout ResNet-18/50 state dict (.pt/.pth/.bin via torch.load(weights_only=True), or a
  .safetensors without robustcl metadata), loaded into robustcl's single-BN ResNet with `mean`/`std`
  (default: the evaluation dataset's channel statistics, what robustcl trains with) in front, and
  L2-normalised features as robustcl's encoders give;
- a module (`evaluate_encoder(module)`) or "package.module:callable" naming one, an nn.Module subclass or a
  Python function with no required parameters that builds one (the rule: robustcl/encoders/load.py); its
  features are used as it returns them.
Non-finite weights, or non-finite features on a first batch, are an error for every kind.
The results directory is a run directory (config.yaml, heads/, results.json, report.md, metrics.jsonl)
plus encoder.json saying what was evaluated; for the first two kinds it also holds encoder.safetensors,
so `robustcl evaluate --run DIR` can add attacks later without refitting.
"""
from robustcl.encoders.evaluate import PROTOCOL_PRESETS, default_out, encoder_config, evaluate_encoder
from robustcl.encoders.load import EncoderError, ModuleEncoder, fingerprint, load_external

__all__ = ["EncoderError", "ModuleEncoder", "PROTOCOL_PRESETS", "default_out", "encoder_config", "evaluate_encoder",
           "fingerprint", "load_external"]
