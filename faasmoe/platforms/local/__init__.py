"""The embedded platform: function instances forked on this machine from a zygote, framed over Unix sockets.

`platform.LocalPlatform` is the platform; `zygote` and `worker` run as their own processes
(`python -m`), so this package imports nothing on its own.
"""
