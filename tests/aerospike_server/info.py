"""Info protocol (proto type 1): "cmd1\\ncmd2\\n" -> "cmd1\\tvalue1\\ncmd2\\tvalue2\\n".

Answers what the aerospike 19.3.0 client sends to tend a one-node cluster (node,
partition-generation, build, user-agent-set, peers-clear-std, peers-generation, replicas),
plus namespaces, sets, statistics, a few identity commands, truncate and the secondary-index
commands. Unknown commands are logged, counted and answered with an empty value.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import AerospikeTestServer

log = logging.getLogger(__name__)

N_PARTITIONS = 4096
BUILD = "8.1.2.0"


@dataclass(frozen=True)
class SecondaryIndex:
    namespace: str
    set_name: str
    name: str
    bin: str
    bin_type: str  # string / numeric / ...
    index_type: str  # default / list / mapkeys / mapvalues

    def describe(self) -> str:
        return (
            f"ns={self.namespace}:indexname={self.name}:set={self.set_name}:bin={self.bin}"
            f":type={self.bin_type}:indextype={self.index_type}:context=NULL:exp=NULL"
            ":state=RW"
        )


def parse_params(text: str) -> dict[str, str]:
    """'a=1;b=2' -> {'a': '1', 'b': '2'}."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class InfoResponder:
    def __init__(self, server: AerospikeTestServer) -> None:
        self.server = server
        self.counts: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()
        self.sindexes: dict[tuple[str, str], SecondaryIndex] = {}
        bitmap = base64.b64encode(b"\xff" * (N_PARTITIONS // 8)).decode()
        self._replicas_bitmap = bitmap

    # -- request / response -------------------------------------------------------

    def respond(self, body: bytes) -> bytes:
        text = body.decode("utf-8", "replace")
        commands = [c for c in text.split("\n") if c]
        if not commands:
            commands = ["node", "build", "edition", "version", "partition-generation"]
        lines = [f"{cmd}\t{self.answer(cmd)}\n" for cmd in commands]
        return "".join(lines).encode("utf-8")

    def answer(self, cmd: str) -> str:
        name, _, arg = cmd.partition(":")
        self.counts[name] += 1
        handler = getattr(self, "_cmd_" + name.replace("-", "_").replace("/", "_"), None)
        if handler is not None:
            return str(handler(arg))
        if name.startswith("sindex/") or name.startswith("namespace/"):
            return self._path_command(name)
        self.unknown[cmd] += 1
        log.warning("aerospike test server: unknown info command %r", cmd)
        return ""

    # -- cluster tending --------------------------------------------------------------

    def _cmd_node(self, _: str) -> str:
        return self.server.node_id

    def _cmd_partition_generation(self, _: str) -> int:
        return 0

    def _cmd_peers_generation(self, _: str) -> int:
        return 0

    def _cmd_rebalance_generation(self, _: str) -> int:
        return 0

    def _cmd_cluster_stable(self, _: str) -> str:
        return "0000000000000001"

    def _cmd_build(self, _: str) -> str:
        return BUILD

    def _cmd_version(self, _: str) -> str:
        return f"Aerospike Community Edition build {BUILD}"

    def _cmd_edition(self, _: str) -> str:
        return "Aerospike Community Edition"

    def _cmd_cluster_name(self, _: str) -> str:
        return self.server.cluster_name

    def _cmd_features(self, _: str) -> str:
        return (
            "batch-any;batch-index;blob-bits;cdt-list;cdt-map;cluster-stable;float;geo;"
            "sindex-exists;peers;pipelining;pquery;pscans;query-show;relaxed-sc;replicas;"
            "replicas-all;replicas-master;truncate-namespace;udf"
        )

    def _cmd_user_agent_set(self, _: str) -> str:
        return "ok"

    def _peers(self, _: str) -> str:
        return f"0,{self.server.port},[]"

    _cmd_peers_clear_std = _peers
    _cmd_peers_clear_alt = _peers
    _cmd_peers_tls_std = _peers
    _cmd_peers_tls_alt = _peers

    def _service(self, _: str) -> str:
        return f"{self.server.host}:{self.server.port}"

    _cmd_service = _service
    _cmd_service_clear_std = _service
    _cmd_service_clear_alt = _service

    def _no_services(self, _: str) -> str:
        return ""  # a one-node cluster has no other services

    _cmd_services = _no_services
    _cmd_services_alumni = _no_services
    _cmd_services_alternate = _no_services

    def _cmd_replicas(self, _: str) -> str:
        return ";".join(f"{ns}:0,1,{self._replicas_bitmap}" for ns in self.server.namespaces)

    def _cmd_replicas_master(self, _: str) -> str:
        return ";".join(f"{ns}:{self._replicas_bitmap}" for ns in self.server.namespaces)

    def _cmd_replicas_all(self, _: str) -> str:
        return ";".join(f"{ns}:1,{self._replicas_bitmap}" for ns in self.server.namespaces)

    def _cmd_racks(self, _: str) -> str:
        return ";".join(f"ns={ns}:rack_0={self.server.node_id}" for ns in self.server.namespaces)

    # -- data model --------------------------------------------------------------------

    def _cmd_namespaces(self, _: str) -> str:
        return ";".join(self.server.namespaces)

    def _cmd_sets(self, arg: str) -> str:
        ns_filter = arg.split("/")[0] if arg else None
        counts: Counter[tuple[str, str]] = Counter(
            (ns, rec.set_name) for (ns, _), rec in self.server.store.snapshot().items()
        )
        return "".join(
            f"ns={ns}:set={s}:objects={n}:tombstones=0:truncate_lut=0;"
            for (ns, s), n in sorted(counts.items())
            if ns_filter is None or ns == ns_filter
        )

    def _cmd_namespace(self, arg: str) -> str:
        return self._namespace_stats(arg)

    def _namespace_stats(self, ns: str) -> str:
        if ns not in self.server.namespaces:
            return "type=unknown"
        objects = sum(1 for (n, _) in self.server.store.snapshot() if n == ns)
        return (
            f"objects={objects};tombstones=0;replication-factor=1;"
            f"storage-engine=memory;strong-consistency=false;default-ttl={self.server.store.default_ttl}"
        )

    def _cmd_statistics(self, _: str) -> str:
        objects = len(self.server.store.snapshot())
        return f"cluster_size=1;objects={objects};uptime=1"

    def _cmd_truncate(self, arg: str) -> str:
        p = parse_params(arg)
        self.server.store.clear(p.get("namespace"), p.get("set"))
        return "ok"

    def _cmd_truncate_namespace(self, arg: str) -> str:
        self.server.store.clear(parse_params(arg).get("namespace"))
        return "ok"

    # -- secondary indexes -------------------------------------------------------------

    def _cmd_sindex_create(self, arg: str) -> str:
        p = parse_params(arg)
        ns = p.get("namespace") or p.get("ns", "")
        name = p.get("indexname", "")
        if ns not in self.server.namespaces or not name:
            return "FAIL:4:invalid sindex-create parameters"
        if "bin" in p:  # 8.x syntax: bin=..;type=..
            bin_name, bin_type = p["bin"], p.get("type", "string")
        else:  # older syntax: indexdata=bin,type
            bin_name, _, bin_type = p.get("indexdata", "").partition(",")
        index = SecondaryIndex(
            ns,
            p.get("set", ""),
            name,
            bin_name,
            bin_type.lower(),
            p.get("indextype", "default").lower(),
        )
        if (ns, name) in self.sindexes:
            if self.sindexes[(ns, name)] == index:
                return "OK"
            return "FAIL:200:index with the same name already exists"
        self.sindexes[(ns, name)] = index
        return "OK"

    def _cmd_sindex_delete(self, arg: str) -> str:
        p = parse_params(arg)
        ns = p.get("namespace") or p.get("ns", "")
        self.sindexes.pop((ns, p.get("indexname", "")), None)
        return "OK"

    def _cmd_sindex_list(self, arg: str) -> str:
        p = parse_params(arg)
        ns = p.get("namespace") or p.get("ns")
        return "".join(
            ix.describe() + ";" for ix in self.sindexes.values() if ns is None or ix.namespace == ns
        )

    def _cmd_sindex_exists(self, arg: str) -> str:
        p = parse_params(arg)
        ns = p.get("namespace") or p.get("ns", "")
        return "true" if (ns, p.get("indexname", "")) in self.sindexes else "false"

    def _cmd_sindex_stat(self, arg: str) -> str:
        p = parse_params(arg)
        ns = p.get("namespace") or p.get("ns", "")
        if (ns, p.get("indexname", "")) not in self.sindexes:
            return "FAIL:201:no index"
        return "load_pct=100;entries=0;used_bytes=0"

    def _path_command(self, name: str) -> str:
        parts = name.split("/")
        if parts[0] == "namespace" and len(parts) == 2:
            return self._namespace_stats(parts[1])
        if parts[0] == "sindex" and len(parts) == 3:
            if (parts[1], parts[2]) in self.sindexes:
                return "load_pct=100;entries=0;used_bytes=0"
            return "FAIL:201:no index"
        if parts[0] == "sindex" and len(parts) == 2:
            return "".join(
                ix.describe() + ";" for ix in self.sindexes.values() if ix.namespace == parts[1]
            )
        return ""
