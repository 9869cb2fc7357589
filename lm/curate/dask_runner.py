"""Beam's DaskRunner, with the fixes the curation graph needs to run on a dask cluster.

`--runner=DaskRunner` maps here (lm/curate/pipeline.py `_local_runner`). Beam 2.77's runner
translates a pipeline into dask bags, but as shipped it gets this graph wrong:
- a multi-output ParDo (`with_outputs`, which every filter stage uses for its rejects) hands
  *all* its outputs, untagged, to every consumer: kept and rejected documents would mix;
- a side input (`AsSingleton`, which CombineGlobally uses for its default, and the stats writer)
  is a bag that each consuming task computes again, from scratch, inside the worker;
- GroupByKey partitions by Python's `hash()`, which differs between worker processes for
  strings (PYTHONHASHSEED) and for None on 3.11, so equal keys can land in different groups.
Here ParDo outputs keep their tag and each consumer reads only its own; side inputs are graph
dependencies, computed once and broadcast; GroupByKey partitions by a hash of the pickled key
(Beam groups by encoded key bytes, so this is its semantics); `Create` spreads its elements over
partitions (the shipped default puts up to 128 in one, and Reshuffle is a no-op, so a small list
of input files would run on one worker); Flatten and shuffle outputs are kept to a few
partitions per worker thread (otherwise counts add up stage after stage); a DoFn is set up once
per worker process and reused by every bundle (not once per bundle: the langid model takes
seconds to build); every leaf of the graph is computed, not only the last one visited; and the
graph is computed as built, without dask's bag optimizations, which turn partitions into lazy
iterators that only the first of two consumers gets to read.

Test hook, off by default: with LM_CURATE_DASK_TRACE_DIR set (in the workers' environment),
each bundle of a ParDo appends `<label>\\t<elements>` to `<dir>/<pid>`, which shows which worker
processes did the work.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import typing as t
import uuid

import apache_beam as beam
import xxhash
from apache_beam import pvalue
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask import dask_runner as upstream
from apache_beam.runners.dask.overrides import (
    _Create,
    _Flatten,
    _GroupAlsoByWindow,
    _GroupByKeyOnly,
    _Reshuffle,
    dask_overrides,
)
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils.windowed_value import WindowedValue

from lm.errors import ConfigError

_TRACE_ENV = "LM_CURATE_DASK_TRACE_DIR"
# Leaves that pass their input through: a bag has no order to reshuffle, and in the global
# window (the only one this graph uses) GroupByKeyOnly's output is already grouped by window.
_IDENTITY = (_Reshuffle, _GroupAlsoByWindow)
_PARTITIONS_PER_THREAD = 4
_MAX_CREATE_PARTITIONS = 1024
# Per worker process: DoFns already set up, by (ParDo token, thread): Beam never runs one DoFn
# instance on two threads at once, and a worker may run several tasks at a time.
_SET_UP: dict[tuple[str, int], beam.DoFn] = {}


def _windowed(item: t.Any) -> WindowedValue:
    if isinstance(item, WindowedValue):
        return item
    return WindowedValue(item, 0, (beam.transforms.window.GlobalWindow(),))


def _unwindowed(item: t.Any) -> t.Any:
    return item.value if isinstance(item, WindowedValue) else item


class _TagReceiver(Receiver):
    def __init__(self, tag: str | None, out: list):
        self.tag, self.out = tag, out

    def receive(self, windowed_value: WindowedValue) -> None:
        self.out.append((self.tag, windowed_value.value))


class _Receivers(dict):
    """Output tag -> receiver, created on first use (the DoFn may emit any declared tag)."""

    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        receiver = self[tag] = _TagReceiver(tag, self.out)
        return receiver


def _run_bundle(items, token: str, label: str, spec, *side_values):
    """One dask partition through a DoFn: a Beam bundle. Returns (tag, value) pairs.

    `spec` is (DoFn, window fn, args, kwargs, side input views). The DoFn is set up on first use
    in this process and thread and then reused (its teardown is the process's exit)."""
    fn, window_fn, args, kwargs, sides = spec
    key = (token, threading.get_ident())
    if key not in _SET_UP:
        fn.setup()
        _SET_UP[key] = fn
    fn = _SET_UP[key]
    out: list = []
    receivers = _Receivers(out)
    handler = _OutputHandler(
        window_fn=window_fn,
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    side_inputs = [
        SideInputMap(view_class, options, [_windowed(v) for v in values])
        for (view_class, options), values in zip(sides, side_values)
    ]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn),
        handler,
        context=DoFnContext(label, state=None),
        side_inputs=side_inputs,
        input_args=list(args),
        input_kwargs=kwargs,
        user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    invoker.invoke_start_bundle()
    n = 0
    for item in items:
        invoker.invoke_process(_windowed(item))
        n += 1
    invoker.invoke_finish_bundle()
    trace = os.environ.get(_TRACE_ENV)
    if trace and n:
        with open(os.path.join(trace, str(os.getpid())), "a", encoding="utf-8") as f:
            f.write(f"{label}\t{n}\n")
    return out


def _concat(*partitions) -> list:
    return [x for part in partitions for x in part]


def _stable_hash(key: t.Any) -> int:
    return xxhash.xxh64_intdigest(pickle.dumps(key, protocol=4))


def _regroup(kv) -> list:
    """A dask group (all items whose key hash collided) -> one (key, values) per distinct key."""
    groups: dict[bytes, tuple[t.Any, list]] = {}
    for key, value in kv[1]:
        groups.setdefault(pickle.dumps(key, protocol=4), (key, []))[1].append(_unwindowed(value))
    return list(groups.values())


def _drain(partition) -> list:
    for _ in partition:
        pass
    return []


@dataclasses.dataclass
class _Visitor(beam.pipeline.PipelineVisitor):
    """Translates each leaf transform into a dask bag, one bag per output PCollection."""

    bag_kwargs: dict
    default_partitions: int
    bags: dict = dataclasses.field(default_factory=dict)  # PCollection -> (bag, raw bag)
    leaves: list = dataclasses.field(default_factory=list)  # raw bags, in visit order
    consumed: set = dataclasses.field(default_factory=set)  # ids of raw bags something reads

    def _input(self, pcoll):
        bag, raw = self.bags[pcoll]
        self.consumed.add(id(raw))
        return bag

    def _bounded(self, bag):
        """A Flatten has the partitions of all its inputs, and a shuffle keeps its input's: left
        alone, counts add up stage after stage (and dask's cost with them)."""
        if bag.npartitions > self.default_partitions:
            return bag.repartition(self.default_partitions)
        return bag

    def visit_transform(self, node) -> None:
        import dask
        from dask import bag as db

        transform = node.transform
        main = node.main_inputs.values()
        inputs = [self._input(p) for p in main if not isinstance(p, pvalue.PBegin)]
        outputs = list(node.outputs.values())
        if isinstance(transform, _Create):
            items = list(transform.values)
            if self.bag_kwargs.get("partition_size"):
                raw = db.from_sequence(items, partition_size=self.bag_kwargs["partition_size"])
            else:
                n = self.bag_kwargs.get("npartitions") or min(len(items), self.default_partitions)
                raw = db.from_sequence(items, npartitions=max(n, 1))
        elif isinstance(transform, _Flatten):
            raw = self._bounded(db.concat(inputs)) if inputs else db.from_sequence([], 1)
        elif isinstance(transform, _GroupByKeyOnly):
            grouped = self._bounded(inputs[0]).groupby(
                lambda kv: _stable_hash(kv[0]), shuffle="tasks"
            )
            raw = grouped.map(_regroup).flatten()
        elif type(transform) is beam.ParDo:
            # Side inputs as placeholders (what Beam ships to its own workers), filled in by the
            # invoker from `sides`, in `node.side_inputs` order.
            args, kwargs = transform.args, transform.kwargs
            sides, side_values = [], []
            for si in node.side_inputs:
                sides.append((type(si), si._view_options()))
                # Unoptimized: the side input's keys stay those of the main graph, so it is
                # computed once, not again through a separately fused copy.
                parts = self._input(si.pvalue).to_delayed(optimize_graph=False)
                side_values.append(dask.delayed(_concat)(*parts))
            windowing = getattr(next(iter(main)), "windowing", None)
            window_fn = windowing.windowfn if windowing is not None else None
            # The DoFn and its arguments are one graph node that every partition's task reads:
            # shipped to each worker once, not pickled into every task.
            spec = dask.delayed((transform.fn, window_fn, args, kwargs, sides), pure=False)
            tagged = inputs[0].map_partitions(
                _run_bundle, uuid.uuid4().hex, node.full_label, spec, *side_values
            )
            self.leaves.append(tagged)
            for pcoll in outputs:
                mine = tagged.filter(lambda r, tag=pcoll.tag: r[0] == tag).map(lambda r: r[1])
                self.bags[pcoll] = (mine, tagged)
            return
        elif isinstance(transform, _IDENTITY) and inputs:
            raw = inputs[0]
        else:
            raise NotImplementedError(
                f"DaskRunner cannot run {node.full_label!r} ({type(transform).__name__})"
            )
        self.leaves.append(raw)
        for pcoll in outputs:
            self.bags[pcoll] = (raw, raw)


class DaskRunner(upstream.DaskRunner):
    """Runs a pipeline on a dask.distributed cluster (`--dask_client_address=HOST:PORT`)."""

    def run_pipeline(self, pipeline, options):
        import dask.distributed as ddist

        dask_options = options.view_as(upstream.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = upstream.DaskOptions._extract_bag_kwargs(dask_options)
        try:
            client = ddist.Client(**dask_options)
        except OSError as e:  # no scheduler there (distributed raises a TimeoutError)
            where = dask_options.get("address") or "a new local cluster"
            raise ConfigError(f"cannot reach the dask scheduler at {where}: {e}") from None
        pipeline.replace_all(dask_overrides())
        # Each partition is a task per stage: a few per worker thread keeps every worker busy
        # without paying dask's per-task overhead on thousands of tiny tasks.
        threads = sum(client.nthreads().values()) or 1
        visitor = _Visitor(
            bag_kwargs, min(_PARTITIONS_PER_THREAD * threads, _MAX_CREATE_PARTITIONS)
        )
        pipeline.visit(visitor)
        # Every bag nothing else reads is an end of the graph; drained on the workers, so no
        # data comes back to this process.
        ends = [b.map_partitions(_drain) for b in visitor.leaves if id(b) not in visitor.consumed]
        # Unoptimized: dask's bag optimizations fuse tasks and make partitions lazy iterators,
        # and a lazy partition that two consumers read (a Flatten read by a writer and by the
        # statistics) reaches only the first of them.
        futures = client.compute(ends, optimize_graph=False) if ends else []
        return _Result(client, futures)


@dataclasses.dataclass
class _Result(upstream.DaskRunnerResult):
    """Closes the client once the graph finished (or failed)."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            self.client.close()
