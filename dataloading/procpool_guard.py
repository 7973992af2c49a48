"""Imported only by `procpool`'s forkserver, as its first preload module (never import it
elsewhere: importing it arms a death signal on the importing process).

It ties the forkserver's life to the process that started it (`procpool.die_with_parent`) and
records the server's pid for the workers forked from it, which then die with the server. So a
SIGKILLed ``tsn pack`` leaves no forkserver, no worker and (its pipe closed) no resource tracker.
"""

import os

from dataloading import procpool

# The server holds the caller's "alive" pipe; workers would keep it (and the caller's stdout) open.
procpool.die_with_parent(procpool._env_pid(procpool.PARENT_PID_ENV))
os.environ[procpool.SERVER_PID_ENV] = str(os.getpid())
