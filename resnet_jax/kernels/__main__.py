"""Prebuilds the oneDNN kernel library, e.g. once per cluster image or shared cache.

    python -m resnet_jax.kernels build     # prints the library's path; exit status 0
                                           # or why it cannot be built; exit status 1

Training builds it on first use anyway; prebuilding moves the compile (and any
missing compiler or oneDNN wheel) out of the first run. Honours
RESNET_JAX_CACHE (where), CXX (which compiler) and RESNET_JAX_BUILD_TIMEOUT.
"""
from __future__ import annotations

import sys

USAGE = 'usage: python -m resnet_jax.kernels build'


def main(argv: list[str]) -> int:
  if argv != ['build']:
    print(USAGE, file=sys.stderr)
    return 2
  from resnet_jax.kernels import onednn  # pylint: disable=g-import-not-at-top  (jax: after the usage check)
  try:
    path = onednn.build_library()
  except onednn.OneDNNUnavailable as e:
    print(f'The oneDNN kernel library cannot be built here: {e}', file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
