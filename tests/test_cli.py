"""Command-line plumbing shared by the entry points: --config.* overrides and one-sentence errors."""

import pytest
from conftest import load_config

from dreamvla_jax import eval as eval_cli
from dreamvla_jax.cli import UsageError, apply_overrides


def test_overrides_set_typed_values():
    c = load_config('debug')
    apply_overrides(c, ['--config.train.lr=3e-4', '--config.data.features=/x/feat', '--config.eval.execute=chunk',
                        '--config.train.steps=7', '--config.model.cameras=("static",)'])
    assert c.train.lr == pytest.approx(3e-4)
    assert c.data.features == '/x/feat' and c.eval.execute == 'chunk'
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert tuple(c.model.cameras) == ('static',)


@pytest.mark.parametrize('arg, words', [
    ('--config.train.nope=1', "no field 'train.nope'"),
    ('--config.nope.lr=1', "no field 'nope'"),
    ('--config.train.steps=abc', '--config.train.steps=abc'),
    ('--config.train.steps', 'config overrides look like'),
])
def test_bad_overrides_name_the_flag(arg, words):
    with pytest.raises(UsageError, match=words.replace('(', r'\(').replace('.', r'\.')):
        apply_overrides(load_config('debug'), [arg])


def test_eval_takes_config_overrides_and_rejects_other_flags(capsys):
    args = eval_cli.parse_args(['--config', 'configs/calvin.py:debug', '--config.eval.execute=chunk'])
    assert args.config_overrides == ['--config.eval.execute=chunk']
    with pytest.raises(SystemExit):
        eval_cli.parse_args(['--bogus'])
    assert 'unrecognized arguments: --bogus' in capsys.readouterr().err


def test_train_unknown_override_is_one_sentence():
    """absl's config_flags raises a bare AttributeError for an unknown field; `train` checks the keys first."""
    import subprocess
    import sys
    from pathlib import Path

    from dreamvla_jax.cli import check_override_keys

    check_override_keys(load_config('debug'), ['--config.train.lr=1', '--config.model.vision.stem', 'conv'])
    with pytest.raises(UsageError, match=r"--config\.model\.vision\.nosuch: the config has no field"):
        check_override_keys(load_config('debug'), ['--workdir=x', '--config.model.vision.nosuch=conv'])
    r = subprocess.run([sys.executable, '-m', 'dreamvla_jax.train', '--config', 'configs/calvin.py:debug',
                        '--workdir', 'unused', '--config.train.nosuch=1'],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip() == "error: --config.train.nosuch: the config has no field 'train.nosuch'"
