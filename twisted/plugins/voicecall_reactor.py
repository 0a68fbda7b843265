"""Reactor plugin: `twistd --reactor=voicecall-epoll` (see voicecall.infra.reactor). Import-light."""
from twisted.application.reactors import Reactor

voicecall_epoll = Reactor(
    "voicecall-epoll",
    "voicecall.infra.reactor",
    "epoll (Linux), returning to due timers between I/O events: keeps media pacing on time under load",
)
