"""The hardware description of docs/formats.md, read from /proc and /sys without shelling out."""

from __future__ import annotations

from pathlib import Path


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def cpu_model(root: Path) -> str:
    for line in _read(root / "proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return "unknown"


def gpu_names(root: Path) -> str:
    """Names of the display devices: NVIDIA's own list first, else the DRM cards' PCI ids."""
    names: list[str] = []
    nvidia = root / "proc/driver/nvidia/gpus"
    if nvidia.is_dir():
        for gpu in sorted(nvidia.iterdir()):
            for line in _read(gpu / "information").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    names.append(value.strip())
    if not names:
        drm = root / "sys/class/drm"
        if drm.is_dir():
            for card in sorted(drm.glob("card[0-9]")):
                vendor = _read(card / "device/vendor")
                device = _read(card / "device/device")
                if vendor:
                    names.append(f"{vendor}:{device}")
    return ", ".join(names) if names else "none"


def memory_kb(root: Path) -> str:
    for line in _read(root / "proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return line.split()[1]
    return "0"


def drive_serial(root: Path) -> str:
    """Serial of the first real block device that reports one (nvme, sd, vd, mmc)."""
    block = root / "sys/block"
    if not block.is_dir():
        return "unknown"
    for dev in sorted(block.iterdir()):
        if dev.name.startswith(("loop", "ram", "zram", "dm-", "md", "sr")):
            continue
        for candidate in ("device/serial", "serial", "device/wwid", "device/cid"):
            value = _read(dev / candidate)
            if value:
                return value
    return "unknown"


def describe(root: Path = Path("/")) -> str:
    """``CPU: <model>. GPU: <names>. Memory: <MemTotal kB>. DriveSerial: <serial>.``"""
    return (
        f"CPU: {cpu_model(root)}. GPU: {gpu_names(root)}. "
        f"Memory: {memory_kb(root)}. DriveSerial: {drive_serial(root)}."
    )
