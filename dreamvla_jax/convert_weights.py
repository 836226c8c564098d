r"""Convert pretrained weights into one Orbax checkpoint for ``train`` / ``eval``.

HF encoders and GPT-2 (for training from scratch, ``--config.init.pretrained``):

  python -m dreamvla_jax.convert_weights --clip CLIP_DIR --mae MAE --gpt2 GPT2_DIR --out OUT --verify
  python -m dreamvla_jax.train --config configs/calvin.py --workdir W --config.init.pretrained=OUT

Official PyTorch checkpoints (``--config.init.official``, or ``eval --checkpoint``):

  python -m dreamvla_jax.convert_weights --dreamvla dreamvla_calvin.pth --clip CLIP_DIR --mae MAE --out OUT
  python -m dreamvla_jax.convert_weights --seer seer_large.pth --clip CLIP_DIR --mae MAE --out OUT

Each DIR is a ``save_pretrained`` folder (config.json + model.safetensors or pytorch_model.bin): CLIPModel
or CLIPTextModelWithProjection, ViTMAEModel or ViTMAEForPreTraining, GPT2Model or GPT2LMHeadModel. MAE may
also be the original ``mae_pretrain_vit_base.pth`` file (the original OpenAI CLIP ``ViT-B-32.pt`` is not
supported: use the HF folder ``openai/clip-vit-base-patch32``). ``--dreamvla`` / ``--seer`` take the
official DreamVLA CALVIN checkpoint / the Seer-Large pre-training checkpoint (``.pth``); with Seer, what
DreamVLA adds (depth/SAM heads, DiT, dream queries) keeps its initialisation and is listed. Any subset may
be given. ``--verify`` compares the HF encoders and GPT-2 with transformers in fp32 and fails above
``--tolerance``. Errors are one sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dreamvla_jax import cli
from dreamvla_jax.convert import clip, gpt2, mae, official
from dreamvla_jax.convert.common import ConvertError, read_config
from dreamvla_jax.convert.pretrained import save_pretrained

# flag -> (source module, config section it targets)
SOURCES = {
    'clip': (clip, lambda c: c.model.text),
    'mae': (mae, lambda c: c.model.vision),
    'gpt2': (gpt2, lambda c: c.model),
}


def load_config(spec: str):
    """``path/to/file.py[:preset]`` -> ``get_config(preset)`` (as ``--config`` does for ``train``)."""
    try:
        return cli.load_config(spec)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.convert_weights', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--clip', metavar='DIR', help='CLIPModel / CLIPTextModelWithProjection folder')
    p.add_argument('--mae', metavar='DIR|PTH', help='ViTMAEModel / ViTMAEForPreTraining folder, or the '
                   'original mae_pretrain_vit_base.pth')
    p.add_argument('--gpt2', metavar='DIR', help='GPT2Model / GPT2LMHeadModel folder')
    ckpt = p.add_mutually_exclusive_group()
    ckpt.add_argument('--dreamvla', metavar='CKPT', help='official DreamVLA CALVIN checkpoint (.pth)')
    ckpt.add_argument('--seer', metavar='CKPT', help='Seer-Large pre-training checkpoint (.pth)')
    p.add_argument('--trust-pickle', action='store_true',
                   help='let torch unpickle arbitrary objects in --dreamvla/--seer (trusted files only)')
    p.add_argument('--out', metavar='OUT', required=True, help='Orbax checkpoint directory to write')
    p.add_argument('--config', default='configs/calvin.py',
                   help='target model config, file.py[:preset] (default: %(default)s)')
    p.add_argument('--verify', action='store_true',
                   help='compare with the transformers reference (needs torch) and fail above --tolerance')
    p.add_argument('--tolerance', type=float, default=1e-5, help='max abs difference (fp32) for --verify')
    p.add_argument('--allow-eps-mismatch', action='store_true',
                   help='convert although a LayerNorm eps differs (facebook/vit-mae-base: 1e-12, MAE: 1e-6)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = p.parse_args(argv)
    if not any((args.clip, args.mae, args.gpt2, args.dreamvla, args.seer)):
        p.error('give at least one of --clip, --mae, --gpt2, --dreamvla, --seer')
    if args.gpt2 and (args.dreamvla or args.seer):
        p.error('--gpt2 cannot be combined with --dreamvla/--seer: their checkpoint holds the backbone')
    return args


def official_kind(args) -> str | None:
    return 'dreamvla' if args.dreamvla else 'seer' if args.seer else None


def _is_mae_pth(args) -> bool:
    return bool(args.mae) and Path(args.mae).is_file()


def run(args) -> dict[str, dict[str, float]]:
    """Converts, saves and optionally verifies; returns the verification diffs (empty without --verify)."""
    from tqdm import tqdm

    config = load_config(args.config)
    params, meta, diffs = {}, {'config': args.config, 'parts': {}}, {}
    kind = official_kind(args)
    if kind:  # first: a wrong or foreign checkpoint fails before the encoders are converted
        path = args.dreamvla or args.seer
        t0 = time.time()
        conv = official.convert(path, config, kind, progress=not args.no_progress,
                                trust_pickle=args.trust_pickle)
        params.update(conv.params)
        meta.update(kind=kind, source=str(Path(path).absolute()), tensors_used=len(conv.used),
                    skipped=conv.skipped, initialised=conv.initialised, notes=official.NOTES[kind])
        print(f"{official.summary(conv)} ({time.time() - t0:.1f} s)", file=sys.stderr)
        for note in official.NOTES[kind]:
            print(f"note: {note}", file=sys.stderr)
    for flag in tqdm([f for f in SOURCES if getattr(args, f)], desc='models', disable=args.no_progress):
        source, section = SOURCES[flag]
        folder = getattr(args, flag)
        t0 = time.time()
        if flag == 'mae' and _is_mae_pth(args):
            converted = official.convert_mae_pth(folder, section(config), progress=not args.no_progress)
            src_cfg = {'model_type': 'mae (original .pth, timm names)'}
        else:
            converted = source.convert(folder, section(config), progress=not args.no_progress,
                                       check_eps=not args.allow_eps_mismatch)
            src_cfg = read_config(folder)
        params[source.PART] = converted.params
        meta['parts'][source.PART] = {
            'source': str(Path(folder).absolute()), 'model_type': src_cfg.get('model_type'),
            'architectures': src_cfg.get('architectures'), 'tensors_used': len(converted.used),
            'tensors_skipped': converted.skipped}
        print(f"{flag}: {len(converted.used)} tensors -> {source.PART}, {len(converted.skipped)} skipped by "
              f"name ({time.time() - t0:.1f} s)", file=sys.stderr)
    if kind:
        out = official.save_converted(args.out, params, meta)
    else:
        out = save_pretrained(args.out, params, meta)
    print(f"wrote {out}", file=sys.stderr)
    if args.verify:
        for flag in SOURCES:
            if flag == 'mae' and _is_mae_pth(args):
                print('verify mae: skipped (no reference model for the original .pth)')
            elif getattr(args, flag):
                source, section = SOURCES[flag]
                diffs[flag] = source.verify(getattr(args, flag), params[source.PART], section(config))
                worst = max(diffs[flag].values())
                status = 'ok' if worst <= args.tolerance else 'FAIL'
                detail = ', '.join(f'{k} {v:.2e}' for k, v in diffs[flag].items())
                print(f"verify {flag}: max abs diff {detail} (tolerance {args.tolerance:g}): {status}")
    return diffs


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        diffs = run(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(max(d.values()) > args.tolerance for d in diffs.values()):
        print(f"error: verification failed: a max abs difference exceeds {args.tolerance:g}.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
