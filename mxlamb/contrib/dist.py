"""mxlamb on MXNet's parameter-server kvstore (ps-lite), on one machine or several.

Launch a job on this machine (scheduler, servers and workers as processes on 127.0.0.1)::

    python -m mxlamb.launch --workers 2 --servers 1 -- python train.py --epochs 3

and in ``train.py``, before the first forward pass with ``autograd.record()``::

    trainer = gluon.Trainer(net.collect_params(), 'lamb', {...}, kvstore='dist_sync')
    mxlamb.contrib.dist.prepare(trainer, batch_size)   # the batch_size you pass to trainer.step

What the launcher does that MXNet's own servers do not:

* Its servers import mxnet and mxlamb completely before they serve, and a server whose
  optimizer cannot be unpickled (a class defined in the worker's ``__main__``, a module the
  server cannot import) or whose update raises stops with the error. MXNet's server prints
  such an exception and goes on storing summed gradients as weights; the workers then finish
  with wrong weights and exit code 0. The launcher stops the whole job and exits non-zero.
* It turns MXNet's slicing of big arrays across servers off (``MXNET_KVSTORE_BIGARRAY_BOUND``
  above any parameter size, unless you set it): LAMB's trust ratio is a norm of the whole
  tensor, and a server holding a slice would take the norm of its slice. Wherever slicing is
  on anyway, mxlamb's optimizer on the server refuses the step, naming the parameter.

:func:`prepare` closes a race of Gluon's Trainer: it pulls the initial weights from the
kvstore lazily, in the first ``step``, with no dependency on that step's gradient push, so a
fast worker's gradients can reach the server before a slow worker's weight pull and the slow
worker receives summed gradients as its weights.
"""
import argparse
import numbers
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback

__all__ = ["launch", "prepare", "serve", "node_environment", "stop_server", "check_on_server"]

# Larger than any parameter (MXNet reads it as a 32-bit int): no array is sliced across servers.
_NO_SLICING = str(2 ** 31 - 1)
_ROLE_VARIABLE = "MXLAMB_DMLC_ROLE"


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_environment(role, port, workers, servers, base=None):
    """The environment of one ps-lite node on this machine: every address is 127.0.0.1.

    ``DMLC_NODE_HOST`` and ``DMLC_INTERFACE`` matter: without them ps-lite advertises the
    address of the machine's external interface."""
    env = dict(os.environ if base is None else base)
    env.update({
        "DMLC_ROLE": role,
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": str(port),
        "DMLC_NUM_WORKER": str(workers),
        "DMLC_NUM_SERVER": str(servers),
        "DMLC_NODE_HOST": "127.0.0.1",
        "DMLC_INTERFACE": "lo",
    })
    env.setdefault("MXNET_KVSTORE_BIGARRAY_BOUND", _NO_SLICING)
    return env


def launch(command, workers=2, servers=1, port=None, env=None, timeout=None, log=sys.stderr,
           server_command=None):
    """Runs ``command`` (a list) as each of ``workers`` worker processes, with a scheduler
    and ``servers`` mxlamb servers, all on 127.0.0.1. Returns 0 when every worker succeeded;
    otherwise stops every process and returns the first failure's exit code (or 124 on
    timeout), after saying which process failed.

    ``server_command`` runs the scheduler and servers with another command instead (with the
    role in ``DMLC_ROLE``), such as MXNet's own ``python -c "import mxnet"``."""
    if workers < 1 or servers < 1:
        raise ValueError("mxlamb.contrib.dist.launch: workers=%r and servers=%r must both be >= 1"
                         % (workers, servers))
    port = port or _free_port()
    processes = []

    def start(name, role, argv):
        node_env = node_environment(role, port, workers, servers, base=env)
        if role != "worker" and server_command is None:
            # Our server entry imports everything first, then takes the role (see serve()).
            node_env[_ROLE_VARIABLE] = node_env.pop("DMLC_ROLE")
        processes.append((name, subprocess.Popen(argv, env=node_env)))

    server_argv = list(server_command or [sys.executable, "-m", "mxlamb.launch", "--serve"])
    start("scheduler", "scheduler", server_argv)
    for rank in range(servers):
        start("server %d" % rank, "server", server_argv)
    for rank in range(workers):
        start("worker %d" % rank, "worker", list(command))

    deadline = None if timeout is None else time.monotonic() + timeout
    failure = None
    try:
        while failure is None:
            codes = [(name, proc.poll()) for name, proc in processes]
            failed = [(name, code) for name, code in codes if code not in (None, 0)]
            if failed:
                failure = failed[0]
            elif all(code == 0 for name, code in codes if name.startswith("worker")):
                break
            elif deadline is not None and time.monotonic() > deadline:
                failure = ("the job (timeout %ss)" % timeout, 124)
            else:
                time.sleep(0.05)
        if failure is None:
            # The workers' kvstore stops the servers and the scheduler as it shuts down.
            grace = time.monotonic() + 30
            while time.monotonic() < grace and any(p.poll() is None for _, p in processes):
                time.sleep(0.05)
            stragglers = [name for name, proc in processes if proc.poll() is None]
            if stragglers:
                print("mxlamb.contrib.dist: %s did not stop after the workers finished; killed"
                      % ", ".join(stragglers), file=log)
            return 0
        print("mxlamb.contrib.dist: %s failed with exit code %s; stopping the job"
              % failure, file=log)
        return failure[1]
    finally:
        for _, proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for _, proc in processes:
            proc.wait()


def stop_server(what):
    """Ends this kvstore server process at once, saying why. A server must not go on after an
    error: MXNet's prints an exception from the optimizer and keeps serving wrong weights."""
    trace = traceback.format_exc() if sys.exc_info()[0] is not None else ""
    print("mxlamb server: %s; stopping this server so that the job fails\n%s" % (what, trace),
          file=sys.stderr, flush=True)
    os._exit(3)


def serve():
    """Runs this process as the scheduler or a server of a job (``MXLAMB_DMLC_ROLE``).

    ``import mxnet`` in a process whose ``DMLC_ROLE`` is server or scheduler turns into the
    server loop in the middle of mxnet's own import. So the launcher passes the role in
    ``MXLAMB_DMLC_ROLE``; this entry imports mxnet and mxlamb completely as an ordinary
    process, then takes the role and serves, stopping on an optimizer it cannot load or an
    update that raises."""
    role = os.environ.pop(_ROLE_VARIABLE, None)
    if role not in ("server", "scheduler"):
        raise SystemExit("mxlamb.launch --serve: %s must be 'server' or 'scheduler', not %r"
                         % (_ROLE_VARIABLE, role))
    import mxnet  # noqa: F401  (complete import, before the role is set)
    import mxlamb  # noqa: F401  (its optimizers unpickle here)
    from mxnet import kvstore, optimizer
    from mxnet.kvstore.kvstore_server import KVStoreServer

    os.environ["DMLC_ROLE"] = role
    store = kvstore.create("dist")

    def strict(updater):
        def update(key, grad, weight):
            try:
                updater(key, grad, weight)
            except BaseException:  # pylint: disable=broad-except
                stop_server("the update of key %s raised" % key)
        return update

    class StrictServer(KVStoreServer):
        def _controller(self):
            def controller(command, body, _):
                if command != 0:
                    print("mxlamb server: unknown command %d ignored" % command, file=sys.stderr)
                    return
                try:
                    opt = pickle.loads(body)
                except BaseException:  # pylint: disable=broad-except
                    stop_server("the workers' optimizer cannot be unpickled here (is its class "
                           "importable on the server, not defined in the workers' __main__?)")
                store._set_updater(strict(optimizer.get_updater(opt)))
            return controller

    StrictServer(store).run()


def prepare(trainer, batch_size):
    """Sets up ``trainer``'s kvstore now and waits until every worker holds rank 0's initial
    weights. Call it once, after the parameters are initialized (run one forward pass first
    where shapes are inferred) and before the first training step. ``batch_size`` is the one
    you pass to ``trainer.step``: with ``update_on_kvstore`` the optimizer, and with it the
    gradient scale ``1 / batch_size``, goes to the servers now."""
    from mxnet import ndarray

    deferred = [param.name for param in trainer._params if param._deferred_init]
    if deferred:
        raise ValueError("mxlamb.contrib.dist.prepare: parameters %s are not initialized yet (deferred "
                         "shape inference); run one forward pass first" % ", ".join(deferred))
    if not isinstance(batch_size, numbers.Real) or not batch_size > 0:
        raise ValueError("mxlamb.contrib.dist.prepare: batch_size must be a positive number, not %r"
                         % (batch_size,))
    if not trainer._kv_initialized:
        trainer._check_and_rescale_grad(trainer._scale / batch_size)
        trainer._init_kvstore()
    trainer._init_params()
    ndarray.waitall()
    store = trainer._kvstore
    if store is not None and "dist" in store.type:
        store._barrier()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mxlamb.launch",
        description="Runs a distributed MXNet job on this machine (127.0.0.1): a scheduler, "
                    "mxlamb servers and workers running COMMAND.")
    parser.add_argument("--workers", "-n", type=int, default=2)
    parser.add_argument("--servers", "-s", type=int, default=1)
    parser.add_argument("--port", type=int, default=None,
                        help="the scheduler's port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds, then fail")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the worker command after --")
    return launch(command, workers=args.workers, servers=args.servers, port=args.port,
                  timeout=args.timeout)


def check_on_server(optimizer, items):
    """A kvstore server (update_on_kvstore=True) sees one key at a time, and with two or
    more servers possibly a slice of it. MXNet's server swallows an exception from the
    updater and keeps wrong weights, so a step that would be wrong stops the server."""
    options = optimizer.options
    if options.needs_whole_step:
        stop_server("LAMB: %s needs every gradient of a step, but a kvstore server sees "
                    "only its own keys, one at a time; use update_on_kvstore=False"
                    % options.whole_step_reason)
    if not options.layer_adaptation:
        return  # elementwise: a slice updates like the whole
    servers = int(os.environ.get("DMLC_NUM_SERVER", "1"))
    bound = int(os.environ.get("MXNET_KVSTORE_BIGARRAY_BOUND", "1000000"))
    for index, weight, _, _ in items:
        name, size = optimizer._full_sizes.get(index, (optimizer._name_of(index), None))
        if size is not None:
            if weight.size != size:
                stop_server("LAMB: this kvstore server holds %d of the %d elements of "
                            "parameter %r (MXNet slices arrays of at least "
                            "MXNET_KVSTORE_BIGARRAY_BOUND elements across servers), and "
                            "its trust ratio needs the whole tensor; set "
                            "MXNET_KVSTORE_BIGARRAY_BOUND above %d on the workers, or run "
                            "one server (mxlamb.launch does the first)"
                            % (weight.size, size, name, size))
        elif servers > 1 and weight.size >= bound // servers:
            stop_server("LAMB: parameter %r (%d elements on this server) may be a slice of "
                        "a bigger array (MXNET_KVSTORE_BIGARRAY_BOUND=%d, %d servers) and "
                        "its size is unknown here (no Gluon Trainer gave it); set "
                        "MXNET_KVSTORE_BIGARRAY_BOUND above every parameter's size, or run "
                        "one server" % (name, weight.size, bound, servers))
