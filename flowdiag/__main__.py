from flowdiag.cli import app

app(prog_name="flowdiag")
