"""`python -m resnet_jax.benchmark --suite=gpu --quick`: the fresh-machine check, on this CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_gpu_suite_writes_one_json_file(tmp_path):
  path = tmp_path / 'gpu.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run([sys.executable, '-m', 'resnet_jax.benchmark', '--suite=gpu', '--quick',
                        f'--json={path}'], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=1200, check=False)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  r = json.loads(path.read_text())
  assert r['suite'] == 'gpu' and r['quick'] is True and r['recipe'] is None
  assert r['platform'] == 'cpu' and r['device_count'] == len(r['devices']) >= 1
  assert all(d['platform'] == 'cpu' for d in r['devices'])
  assert r['tests']['returncode'] == 0 and r['tests']['passed'] == len(r['tests']['ids']) == 1
  assert r['tests']['failed'] == r['tests']['errors'] == 0
  assert [(t['model'], t['dtype'], t['batch_size']) for t in r['throughput']] == [
      ('cifar_resnet20', 'float32', 8), ('cifar_resnet20', 'bfloat16', 8)]
  for t in r['throughput']:
    assert t['train_images_per_second'] > 0 and t['eval_images_per_second'] > 0
    assert t['train_compile_seconds'] > 0 and t['image_shape'] == [32, 32, 3]
    assert isinstance(t['kernels'], str) and t['kernels'] in r['kernels']
  assert 'cifar_resnet20' in out.stderr and 'device 0: cpu' in out.stderr
