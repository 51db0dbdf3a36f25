"""``import twinkle_client`` works where torch (and ray, fastapi) cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_torch_ray_fastapi():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'ray', 'fastapi', 'transformers', 'peft'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import twinkle_client, twinkle_client.model, twinkle_client.sampler, twinkle_client.session
        import twinkle_client.magics, twinkle_client.widgets
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'fastapi', 'ipywidgets', 'pandas'))
        print('BAD', bad)
        assert not bad, bad
        print('OK')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
