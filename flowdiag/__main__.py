from flowdiag.cli import run

run()
