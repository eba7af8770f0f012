"""A host-memory budget for the worker: a cgroup limit where the machine allows
one, and a watchdog on the worker's RSS everywhere.

The cgroup makes the kernel enforce the budget (its OOM killer stops the
worker inside the group, nothing outside it); the watchdog, run by the
parent's follower thread, catches what a machine without a writable cgroup
cannot, and names what was growing. Either way the run ends `over_budget`.
"""
import os

CGROUP_V2 = "/sys/fs/cgroup"
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


def _own_cgroup_v1():
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return None


def _own_cgroup_v2():
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line.rstrip("\n")[3:]
    return None


class CgroupLimit:
    """A memory cgroup of its own for one worker; removed (empty) at the end."""

    def __init__(self, path, version, limit):
        self.path, self.version, self.limit = path, version, limit

    @classmethod
    def create(cls, name, limit):
        """A limited group next to this process's own, or None where the machine has none writable."""
        for version, make in ((2, cls._v2_parent), (1, cls._v1_parent)):
            try:
                parent = make()
                if parent is None:
                    continue
                path = os.path.join(parent, name)
                os.mkdir(path)
            except OSError:
                continue
            group = cls(path, version, limit)
            try:
                group._write("memory.max" if version == 2 else "memory.limit_in_bytes", str(limit))
                if version == 1:
                    group._write("memory.swappiness", "0")  # no swapping out instead of being limited
                return group
            except OSError:
                group.remove()
        return None

    @staticmethod
    def _v2_parent():
        try:
            with open(os.path.join(CGROUP_V2, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    return None
        except OSError:
            return None
        own = _own_cgroup_v2()
        return None if own is None else os.path.join(CGROUP_V2, own.lstrip("/"))

    @staticmethod
    def _v1_parent():
        own = _own_cgroup_v1()
        if own is None or not os.path.isdir(CGROUP_V1_MEMORY):
            return None
        return os.path.join(CGROUP_V1_MEMORY, own.lstrip("/"))

    def _write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name):
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def add(self, pid):
        self._write("cgroup.procs", str(pid))

    def oom_killed(self):
        """Did the kernel kill a process of this group for going over the limit?"""
        try:
            if self.version == 2:
                events = dict(line.split() for line in self._read("memory.events").splitlines())
                return int(events.get("oom_kill", 0)) > 0
            control = dict(line.split() for line in self._read("memory.oom_control").splitlines())
            return int(control.get("oom_kill", 0)) > 0 or int(self._read("memory.failcnt")) > 0 and \
                int(self._read("memory.max_usage_in_bytes")) >= self.limit
        except (OSError, ValueError):
            return False

    def remove(self):
        try:
            os.rmdir(self.path)  # only an empty group can be removed: the worker has exited
        except OSError:
            pass


def growing_component(samples, window_s=2.0):
    """The component whose bytes rose most over the last `window_s` of samples."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    earlier = next((s for s in reversed(samples) if last["t"] - s["t"] >= window_s), samples[0])
    deltas = {name: value - earlier.get("components", {}).get(name, 0)
              for name, value in last.get("components", {}).items()}
    if not deltas:
        return None
    name = max(deltas, key=deltas.get)
    return name if deltas[name] > 0 else None
