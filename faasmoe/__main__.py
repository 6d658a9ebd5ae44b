from faasmoe.cli import app

app()
