"""Every long-lived faasmoe process says what it is in ps and top (faasmoe.proctitle)."""

from __future__ import annotations

import psutil

from faasmoe.proctitle import role_of, title_of


def test_a_function_host_and_its_zygote_are_named(tiny):
    from faasmoe.control.deployment import Deployment, prewarm_calls
    from faasmoe.models.checkpoint import Checkpoint
    from faasmoe.platforms import PlatformConfig
    from faasmoe.platforms.local.platform import LocalPlatform

    ckpt = Checkpoint(tiny)
    spec = Deployment.plan(ckpt, 4, "float32").specs[-1]
    p = LocalPlatform(PlatformConfig())
    p.start()
    try:
        p.deploy(spec)
        p.invoke_many(prewarm_calls([spec]))
        inst = psutil.Process(p.instances()[0].pid)
        assert title_of(inst) == "faasmoe function host host0"
        assert inst.name().startswith("faasmoe")  # what top shows (the kernel keeps 15 characters)
        assert open(f"/proc/{inst.pid}/cmdline", "rb").read().startswith(b"faasmoe function ")
        assert role_of(inst) == ("function", None)
        assert role_of(inst.parent()) == ("zygote", None) and title_of(inst.parent()) == "faasmoe zygote"
    finally:
        p.close()


def test_a_process_without_a_title_has_no_role():
    assert role_of(psutil.Process()) == ("", None)
