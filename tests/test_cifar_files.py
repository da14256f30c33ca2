"""CIFAR-10/100 from the official files (`config.data.source='files'`).

Every official form (python pickles, binary records, either as a folder or
as the .tar.gz), read back image for image in the official order, and each
kind of bad file refused with an error that names the file and the fix. The
in-process tests write small files (a few images per batch, with the
official sizes patched down to match); the command-line tests write files of
the official sizes, and check that nothing reaches the workdir on bad input.
"""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from resnet_jax import configs
from resnet_jax.data import base, cifar_files
from resnet_jax.data.base import DataError

from cifar_writer import CIFAR10_NAMES, FORMS, official_size, random_dataset, to_pickle, write_form  # pylint: disable=g-bad-import-order
from conftest import run_main  # pylint: disable=g-bad-import-order

@pytest.fixture
def small(monkeypatch):
  """Official sizes patched down: 4 images per training batch file, 6 test images."""
  monkeypatch.setattr(cifar_files, '_SIZES', {'cifar10': {'train': 20, 'test': 6},
                                              'cifar100': {'train': 20, 'test': 6}})
  return {'cifar10': random_dataset(4, 6, 10), 'cifar100': random_dataset(4, 6, 100, seed=1)}


# ----------------------------------------------------------------------------
# Every official form, image for image.


@pytest.mark.parametrize('form', sorted(FORMS))
def test_every_official_form_reads_the_images_labels_and_names_in_the_official_order(
    tmp_path, small, form):
  dataset = FORMS[form][0]
  written = small[dataset]
  write_form(tmp_path, form, written)
  splits, label_names, where = cifar_files.load(str(tmp_path), dataset)
  assert where == os.path.join(str(tmp_path), form)
  for split in ('train', 'test'):
    images, labels = splits[split]
    assert images.dtype == np.uint8 and images.shape == written[split][0].shape
    np.testing.assert_array_equal(images, written[split][0], err_msg=split)
    np.testing.assert_array_equal(labels, written[split][1], err_msg=split)
  assert label_names == tuple(CIFAR10_NAMES if dataset == 'cifar10'
                              else [f'class{i}' for i in range(100)])


def test_data_dir_may_be_the_folder_itself_and_folders_come_before_archives(tmp_path, small):
  folder = write_form(tmp_path, 'cifar-10-batches-bin', small['cifar10'])
  other = random_dataset(4, 6, 10, seed=7)
  write_form(tmp_path, 'cifar-10-python.tar.gz', other)
  splits, _, where = cifar_files.load(folder, 'cifar10')
  assert where == folder
  np.testing.assert_array_equal(splits['test'][0], small['cifar10']['test'][0])
  _, _, where = cifar_files.load(str(tmp_path), 'cifar10')  # the folder, not the archive
  assert where == folder


def test_split_strings_select_as_tfds_does_in_the_files_order(tmp_path, small):
  write_form(tmp_path, 'cifar-10-batches-py', small['cifar10'])
  config = configs.cifar('cifar_resnet20')
  config.data.source, config.data.data_dir = 'files', str(tmp_path)
  config.data.train_split, config.data.val_split = 'train[:15]', 'train[15:]'
  config.data.test_split = 'test[:50%]'
  config.batch_size, config.eval_batch_size = 4, 4
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  source = data.create_data_source(config)
  images, labels = small['cifar10']['train']
  assert source.eval_splits['validation'] == ('train[15:]', 5)
  assert source.eval_splits['test'] == ('test[:50%]', 3)
  splits, _, _ = cifar_files.load(str(tmp_path), 'cifar10')
  for split, (want_images, want_labels) in {'train[:15]': (images[:15], labels[:15]),
                                            'train[15:]': (images[15:], labels[15:]),
                                            'test[:50%]': tuple(x[:3] for x in
                                                                small['cifar10']['test'])}.items():
    got_images, got_labels = base.resolve_split(split, splits, 'split')
    np.testing.assert_array_equal(got_images, want_images, err_msg=split)
    np.testing.assert_array_equal(got_labels, want_labels, err_msg=split)
  # The statistics cache sits beside the data, not in a workdir.
  assert os.listdir(tmp_path / 'resnet_jax_stats')


# ----------------------------------------------------------------------------
# Bad files: each refused, naming the file and the fix.


def _truncate(path, keep):
  with open(path, 'rb') as f:
    payload = f.read()
  with open(path, 'wb') as f:
    f.write(payload[:keep])


def test_missing_files_list_what_was_looked_for_and_three_ways_to_get_them(tmp_path):
  with pytest.raises(DataError) as e:
    cifar_files.load(str(tmp_path), 'cifar10')
  message = str(e.value)
  for form in ('cifar-10-batches-py', 'cifar-10-python.tar.gz', 'cifar-10-batches-bin',
               'cifar-10-binary.tar.gz'):
    assert os.path.join(str(tmp_path), form) in message
  assert 'Three ways to get them' in message and 'cifar.html' in message
  assert 'torchvision' in message and "source='tfds'" in message


def test_a_missing_batch_file_is_named(tmp_path, small):
  folder = write_form(tmp_path, 'cifar-10-batches-py', small['cifar10'])
  os.remove(os.path.join(folder, 'data_batch_3'))
  with pytest.raises(DataError, match=r'data_batch_3 is missing.*Copy the complete folder'):
    cifar_files.load(str(tmp_path), 'cifar10')


@pytest.mark.parametrize('form,name,keep,expected', [
    ('cifar-10-batches-bin', 'data_batch_2.bin', 3073 * 4 - 100,
     r'data_batch_2\.bin has 12,192 bytes; the official file holds 4 records of 3073 bytes '
     r'\(12,292 bytes\), so it is truncated'),
    ('cifar-10-batches-py', 'data_batch_2', 5000,
     r'data_batch_2 is not a CIFAR python pickle .* It may be truncated'),
])
def test_a_truncated_file_is_named_with_its_size(tmp_path, small, form, name, keep, expected):
  folder = write_form(tmp_path, form, small['cifar10'])
  _truncate(os.path.join(folder, name), keep)
  with pytest.raises(DataError, match=expected):
    cifar_files.load(str(tmp_path), 'cifar10')


def test_a_pickle_with_fewer_images_than_the_official_file_is_refused(tmp_path, small):
  folder = write_form(tmp_path, 'cifar-10-batches-py', small['cifar10'])
  with open(os.path.join(folder, 'test_batch'), 'wb') as f:
    f.write(to_pickle({b'labels': [1, 2], b'data': np.zeros((2, 3072), np.uint8)}))
  with pytest.raises(DataError, match=r'test_batch holds 2 images; the official file holds 6'):
    cifar_files.load(str(tmp_path), 'cifar10')


def test_a_truncated_archive_is_refused(tmp_path, small):
  archive = write_form(tmp_path, 'cifar-10-binary.tar.gz', small['cifar10'])
  _truncate(archive, os.path.getsize(archive) // 2)
  with pytest.raises(DataError, match=r'cifar-10-binary\.tar\.gz is not a readable \.tar\.gz.*'
                                      r'truncated\. Download it again'):
    cifar_files.load(str(tmp_path), 'cifar10')


def test_an_archive_without_the_official_files_is_refused(tmp_path):
  with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
    info = tarfile.TarInfo('cifar-10-batches-py/readme.html')
    tar.addfile(info, io.BytesIO(b''))
  with pytest.raises(DataError, match=r'has no cifar-10-batches-py/data_batch_1; it is not the '
                                      r'official archive'):
    cifar_files.load(str(tmp_path), 'cifar10')


class _Payload:
  """Unpickling this would run a command (a pickle can call any function)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('kind', ['list', 'code', 'keys', 'dtype'])
def test_a_pickle_of_another_kind_is_refused_and_never_run(tmp_path, small, kind):
  folder = write_form(tmp_path, 'cifar-10-batches-py', small['cifar10'])
  marker = tmp_path / 'ran'
  payload, expected = {
      'list': ([1, 2, 3], r'data_batch_1 holds a list, not the dict of a CIFAR batch'),
      'code': ({b'data': _Payload(marker)}, r'data_batch_1 is not a CIFAR python pickle '
                                            r'\(UnpicklingError: refusing to load posix\.system'),
      'keys': ({b'images': 1}, r"data_batch_1 has keys \['images'\], not the cifar10 batch keys"),
      'dtype': ({b'data': np.zeros((4, 3072), np.float32), b'labels': [0] * 4},
                r"data_batch_1: 'data' is float32 \[4, 3072\]; a CIFAR batch holds uint8"),
  }[kind]
  with open(os.path.join(folder, 'data_batch_1'), 'wb') as f:
    f.write(to_pickle(payload))
  with pytest.raises(DataError, match=expected):
    cifar_files.load(str(tmp_path), 'cifar10')
  assert not marker.exists()


def test_cifar100_files_given_for_cifar10_are_named_as_such(tmp_path, small):
  write_form(tmp_path, 'cifar-100-python', small['cifar100'])
  with pytest.raises(DataError, match=r"holds cifar100 files .*cifar-100-python.*Set "
                                      r"config\.data\.dataset='cifar100'"):
    cifar_files.load(str(tmp_path), 'cifar10')


def test_a_cifar100_batch_inside_a_cifar10_folder_is_named_as_such(tmp_path, small):
  py = write_form(tmp_path / 'py', 'cifar-10-batches-py', small['cifar10'])
  write_form(tmp_path / 'c100', 'cifar-100-python', small['cifar100'])
  os.replace(tmp_path / 'c100' / 'cifar-100-python' / 'train', os.path.join(py, 'data_batch_1'))
  with pytest.raises(DataError, match=r'data_batch_1 is a cifar100 file, not cifar10'):
    cifar_files.load(str(tmp_path / 'py'), 'cifar10')

  binary = write_form(tmp_path / 'bin', 'cifar-10-batches-bin', small['cifar10'])
  records = np.zeros((4, 3074), np.uint8).tobytes()  # a CIFAR-100 record has two label bytes
  with open(os.path.join(binary, 'data_batch_1.bin'), 'wb') as f:
    f.write(records)
  with pytest.raises(DataError, match=r'data_batch_1\.bin has 12,296 bytes.*it looks like a '
                                      r'cifar100 file'):
    cifar_files.load(str(tmp_path / 'bin'), 'cifar10')


def test_labels_out_of_range_are_refused(tmp_path, small):
  folder = write_form(tmp_path, 'cifar-10-batches-bin', small['cifar10'])
  path = os.path.join(folder, 'test_batch.bin')
  records = np.frombuffer(open(path, 'rb').read(), np.uint8).reshape(6, 3073).copy()
  records[2, 0] = 42
  with open(path, 'wb') as f:
    f.write(records.tobytes())
  with pytest.raises(DataError, match=r'test_batch\.bin has labels in \[\d+, 42\]; cifar10 has '
                                      r'10 classes'):
    cifar_files.load(str(tmp_path), 'cifar10')


# ----------------------------------------------------------------------------
# Writing the official folders (cifar_files.write), checked against this test's
# own writer and read back.


@pytest.mark.parametrize('kind,form', [('pickle', 'cifar-10-batches-py'),
                                       ('binary', 'cifar-10-batches-bin')])
def test_write_gives_the_official_folder_that_load_reads_back(tmp_path, small, kind, form):
  data = small['cifar10']
  folder = cifar_files.write(tmp_path / 'lib', data, CIFAR10_NAMES, kind=kind)
  assert folder == str(tmp_path / 'lib' / form)
  reference = write_form(tmp_path / 'tests', form, data)
  assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))  # no .tmp left behind
  for name in os.listdir(reference):
    ours, theirs = (open(os.path.join(d, name), 'rb').read() for d in (folder, reference))
    if kind == 'binary':
      assert ours == theirs, name
    elif name != 'batches.meta':
      ours, theirs = pickle.loads(ours, encoding='bytes'), pickle.loads(theirs, encoding='bytes')
      np.testing.assert_array_equal(ours[b'data'], theirs[b'data'])
      assert ours[b'labels'] == theirs[b'labels'], name
  splits, names, _ = cifar_files.load(str(tmp_path / 'lib'), 'cifar10')
  assert names == tuple(CIFAR10_NAMES)
  for split in ('train', 'test'):
    np.testing.assert_array_equal(splits[split][0], data[split][0])
    np.testing.assert_array_equal(splits[split][1], data[split][1])


def test_write_refuses_an_existing_folder_and_data_of_the_wrong_size(tmp_path, small):
  data = small['cifar10']
  cifar_files.write(tmp_path, data, CIFAR10_NAMES)
  before = open(tmp_path / 'cifar-10-batches-py' / 'test_batch', 'rb').read()
  with pytest.raises(FileExistsError, match='cifar-10-batches-py exists'):
    cifar_files.write(tmp_path, random_dataset(4, 6, 10, seed=5), CIFAR10_NAMES)
  assert open(tmp_path / 'cifar-10-batches-py' / 'test_batch', 'rb').read() == before
  short = {'train': data['train'], 'test': (data['test'][0][:5], data['test'][1][:5])}
  with pytest.raises(ValueError, match=r"splits\['test'\] images must be uint8 \[6, 32, 32, 3\]"):
    cifar_files.write(tmp_path / 'other', short, CIFAR10_NAMES)
  bad_labels = {'train': data['train'], 'test': (data['test'][0], data['test'][1] + 10)}
  with pytest.raises(ValueError, match=r"needs 6 labels in \[0, 9\]"):
    cifar_files.write(tmp_path / 'other', bad_labels, CIFAR10_NAMES)
  with pytest.raises(ValueError, match="kind must be 'pickle' or 'binary'"):
    cifar_files.write(tmp_path / 'other', data, CIFAR10_NAMES, kind='png')
  assert not os.path.exists(tmp_path / 'other')


# ----------------------------------------------------------------------------
# Through the public command line, with files of the official sizes.


_SHORT_RUN = ['--config=experiments/cifar_resnet20.py', '--config.data.source=files',
              '--config.data.val_split=train[49984:]', '--config.data.test_split=test[:16]',
              '--config.batch_size=8', '--config.eval_batch_size=16',
              '--config.num_train_steps=2', '--config.log_every_steps=1',
              '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2',
              '--config.progress_bar=False']


def _train(root, form):
  write_form(root / 'data', form, official_size())
  workdir = root / 'run'
  out = run_main(*_SHORT_RUN, f"--config.data.data_dir={root / 'data'}", f'--workdir={workdir}')
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return root / 'data', workdir


@pytest.fixture(scope='module')
def python_folder_run(tmp_path_factory):
  """(data_dir, workdir) of a 2-step run trained from cifar-10-batches-py."""
  return _train(tmp_path_factory.mktemp('files_run'), 'cifar-10-batches-py')


# The binary folder: test_no_tensorflow.
@pytest.mark.parametrize('form', ['cifar-10-batches-py', 'cifar-10-python.tar.gz',
                                  'cifar-10-binary.tar.gz'])
def test_training_from_each_official_form_through_the_command_line(tmp_path, form, request):
  if form == 'cifar-10-batches-py':
    _, workdir = request.getfixturevalue('python_folder_run')
  else:
    _, workdir = _train(tmp_path, form)
  result = json.loads((workdir / 'result.json').read_text())
  assert (result['steps'], result['data'], result['test_examples']) == (2, 'cifar10', 16)
  last = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  assert (last['step'], last['validation_split'], last['validation_examples']) == (
      2, 'train[49984:]', 16)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  # result.json names the training images as the checkpoint does (what a resume checks),
  # so that a report keeps runs on different copies of CIFAR-10 apart.
  meta = json.loads((workdir / 'checkpoints' / '2' / 'meta' / 'metadata').read_text())
  assert result['train_data'] == {'examples': meta['fingerprint']['data.train.examples'],
                                  'digest': meta['fingerprint']['data.train.digest']}
  assert result['train_data']['examples'] == 45_000
  assert len(result['train_data']['digest']) == 24


def _bad_data(root, kind):
  """A data_dir with one kind of bad input; the first file read is the bad one."""
  root.mkdir()
  if kind == 'missing':
    return 'No cifar10 files in'
  if kind == 'truncated':
    folder = root / 'cifar-10-batches-bin'
    folder.mkdir()
    (folder / 'data_batch_1.bin').write_bytes(bytes(3073 * 100))
    return (f"{folder / 'data_batch_1.bin'} has 307,300 bytes; the official file holds 10,000 "
            'records of 3073 bytes (30,730,000 bytes), so it is truncated or not this dataset.')
  if kind == 'wrong_pickle':
    folder = root / 'cifar-10-batches-py'
    folder.mkdir()
    (folder / 'data_batch_1').write_bytes(to_pickle(['not', 'a', 'batch']))
    return f"{folder / 'data_batch_1'} holds a list, not the dict of a CIFAR batch"
  assert kind == 'cifar100'
  (root / 'cifar-100-python').mkdir()
  return "holds cifar100 files"


@pytest.mark.parametrize('kind', ['missing', 'truncated', 'wrong_pickle', 'cifar100'])
def test_bad_data_through_the_command_line_is_one_error_line_and_writes_nothing(tmp_path, kind):
  expected = _bad_data(tmp_path / 'data', kind)
  before = sorted(str(p) for p in (tmp_path / 'data').rglob('*'))
  workdir = tmp_path / 'run'
  out = run_main(*_SHORT_RUN, f"--config.data.data_dir={tmp_path / 'data'}", f'--workdir={workdir}')
  assert out.returncode == 2, (out.stdout + out.stderr)[-4000:]
  assert out.stderr.startswith('error: ') and expected in out.stderr, out.stderr[-4000:]
  assert 'Traceback' not in out.stdout + out.stderr
  assert not workdir.exists()
  assert sorted(str(p) for p in (tmp_path / 'data').rglob('*')) == before  # no statistics cache


def test_exported_weights_reproduce_their_stated_error_on_the_files(python_folder_run, tmp_path,
                                                                     capsys):
  from resnet_jax import evaluate, export  # pylint: disable=g-import-not-at-top
  data_dir, workdir = python_folder_run
  weights = str(tmp_path / 'weights')
  assert export.main(['--workdir', str(workdir), '--name', 'files_r20', '--out_dir', weights]) == 0
  stated = json.loads((workdir / 'result.json').read_text())['test_error']
  out_file = tmp_path / 'evaluation.json'
  # The split comes from the shipped file: the run's test split, test[:16].
  assert evaluate.main(['--pretrained=files_r20', f'--weights_dir={weights}',
                        f'--data_dir={data_dir}', f'--out={out_file}', '--batch_size=5']) == 0
  measured = json.loads(out_file.read_text())
  assert (measured['split'], measured['examples'], measured['dataset']) == ('test[:16]', 16,
                                                                           'cifar10')
  assert measured['error'] == pytest.approx(stated, abs=1e-9)
  assert sorted(measured['per_class_error']) == sorted(CIFAR10_NAMES)
  assert 'agrees.' in capsys.readouterr().out
  # Another split than the stated one: a different figure, and no claim to compare it with.
  assert evaluate.main(['--pretrained=files_r20', f'--weights_dir={weights}',
                        f'--data_dir={data_dir}', '--split=test[:40]', f'--out={out_file}']) == 0
  assert json.loads(out_file.read_text())['examples'] == 40
  assert 'another split, not compared' in capsys.readouterr().out
  # A run's workdir: its newest checkpoint, normalised with the run's statistics.
  assert evaluate.main([f'--workdir={workdir}', f'--data_dir={data_dir}', '--split=test[:16]',
                        f'--out={out_file}']) == 0
  assert json.loads(out_file.read_text())['error'] == pytest.approx(stated, abs=1e-9)
  # Bad input: one error line, status 2.
  assert evaluate.main(['--pretrained=files_r20', f'--weights_dir={weights}',
                        f'--data_dir={tmp_path}']) == 2
  assert 'No cifar10 files in' in capsys.readouterr().err
