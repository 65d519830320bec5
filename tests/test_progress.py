"""Progress lines: rate and ETA leave out the first step (a compile, a start-up)."""

from beam_dl.operations.progress import Progress


def test_eta_counts_from_the_first_update_not_the_slow_first_step():
  now = [0.0]
  lines = []
  progress = Progress(101, every_secs=0, clock=lambda: now[0], log=lines.append)
  now[0] = 30.0  # the first step compiles for 30 s
  progress.update()
  for _ in range(10):  # then 10 steps at 0.5 s each
    now[0] += 0.5
    progress.update()
  assert lines[0].endswith('eta ?')
  # 10 steps in 5 s after the first: 2 steps/s, 90 left -> 45 s (from the start it would be 245 s).
  assert lines[-1] == 'progress: 11/101 steps 2.0 steps/s eta 45s'


def test_the_last_line_has_no_eta_left():
  now = [0.0]
  lines = []
  progress = Progress(2, every_secs=100, clock=lambda: now[0], log=lines.append)
  now[0] = 1.0
  progress.update()
  now[0] = 2.0
  progress.update(loss=0.5)
  assert lines[-1] == 'progress: 2/2 steps 1.0 steps/s eta 0s loss=0.5'


def test_an_unknown_total_is_never_reached():
  now = [0.0]
  lines = []
  progress = Progress(None, unit='elements', every_secs=60, clock=lambda: now[0], log=lines.append)
  for _ in range(900):  # 900 inputs in 90 s: a line on the first and then once a minute
    now[0] += 0.1
    progress.update()
  assert len(lines) == 2, lines
  assert lines[-1] == 'progress: 601 elements 10.0 elements/s'
  assert not progress.finished


def test_count_progress_logs_every_interval_not_every_element(capsys):
  from beam_dl.operations.progress import CountProgressFn

  fn = CountProgressFn('read', every_secs=60)
  for x in range(900):
    fn(x)
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
