"""The kvdispatch plugin hooks (pluggy project name ``"kvdispatch"``).

A plugin is a module or object with ``@kvdispatch.hookimpl`` functions, found through the
``kvdispatch`` entry-point group. The built-in backends register exactly that way, so a
third-party backend is a peer of ours, not a special case::

    # pyproject.toml of a third-party package
    [project.entry-points.kvdispatch]
    mybackend = "my_package.kvdispatch_plugin"

    # my_package/kvdispatch_plugin.py
    import kvdispatch
    @kvdispatch.hookimpl
    def kvdispatch_backends():
        return [MyBackend()]

Selection is NOT a hook: the registry filters the declared backends itself, so
``kvdispatch.select_backend()`` and ``kvdispatch info`` can explain every choice before anything runs.
"""

import pluggy

PROJECT = "kvdispatch"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvdispatch_backends():
    """Return the :class:`kvdispatch.Backend` instances this plugin provides.

    Called by the registry once, when it first loads its plugins (the first public call,
    ``list_backends()`` or ``kvdispatch info``). Return every backend the plugin knows, available on
    this machine or not: ``Backend.available()`` says which, and why not.
    """

