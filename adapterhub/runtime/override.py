"""Putting a callable of ours in place of one module's ``forward``, and the original back exactly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adapterhub.errors import AttachedStateError


class ForwardOverride:
    """Mixin for a site that replaces ``self.module``'s forward with itself.

    The subclass sets ``module``, ``path``, ``previous`` (the instance-level forward seen when it was
    planned, or None) and ``installed``; the class attributes word the two errors.
    """

    module: Any
    path: str
    previous: Any
    installed: bool
    #: when the forward may have changed under us, and what to do then
    changed_when = "between planning and attaching"
    changed_fix = "attach again"
    #: who installed ours, and how to take it off after someone else wrapped it
    owner = "adapterhub attached to it"
    undo_fix = "undo that change first (remove the other wrapper), then detach"

    def install(self) -> None:
        if self.module.__dict__.get("forward") is not self.previous:
            raise AttachedStateError(f"the forward of {self.path} changed {self.changed_when}.\n"
                                     f"  fix: {self.changed_fix}.")
        self.module.forward = self
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        if self.module.__dict__.get("forward") is not self:
            raise AttachedStateError(f"the forward of {self.path} was replaced by someone else after {self.owner}.\n"
                                     f"  fix: {self.undo_fix}.")
        if self.previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.previous
        self.installed = False


def install_all(sites: Iterable[Any]) -> None:
    """Install every site, or none: a failure uninstalls those already installed, then re-raises."""
    done: list[Any] = []
    try:
        for site in sites:
            site.install()
            done.append(site)
    except BaseException:
        for site in reversed(done):
            site.uninstall()
        raise
