"""`python -m dreamvla_jax.demo --quick` end to end: every stage runs and the report has its public shape."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, root):
    work = tmp_path / 'demo'
    proc = subprocess.run([sys.executable, '-m', 'dreamvla_jax.demo', '--workdir', str(work), '--quick'],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((work / 'report.json').read_text())
    assert set(report) == {'tasks', 'mean_success'}
    assert 0.0 <= report['mean_success'] <= 1.0
    assert len(report['tasks']) == 6
    for name, row in report['tasks'].items():
        assert set(row) == {'success', 'random', 'mean_action', 'episodes'}, name
        assert row['episodes'] == 1, name
        for key in ('success', 'random', 'mean_action'):
            assert 0.0 <= row[key] <= 1.0, (name, key)

    for page in ('report.md', 'report.html', 'losses.png'):
        assert (work / page).stat().st_size > 0, page
    videos = [p for p in (work / 'eval' / 'media').glob('episode_*.*') if p.suffix in ('.mp4', '.gif')]
    assert videos and all(v.stat().st_size > 0 for v in videos)
    assert 'losses.png' in (work / 'report.md').read_text()

    # A rerun skips every finished stage and rewrites the same report.
    again = subprocess.run([sys.executable, '-m', 'dreamvla_jax.demo', '--workdir', str(work), '--quick'],
                           cwd=root, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('done already') == 4
    assert json.loads((work / 'report.json').read_text()) == report
