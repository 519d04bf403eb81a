"""`gateway simulate ...`: the simulators as processes a person or a test can start and signal."""

from __future__ import annotations

import argparse
import logging
import mimetypes
import signal
import sys
import threading

from gateway.config import parse_address
from gateway.exits import EXIT_INTERRUPTED


def run_simulator(args: argparse.Namespace) -> int:
    """Run one simulator; a Ctrl-C ends it without a traceback, exit status 130."""
    # pynetdicom logs every PDU at INFO; the simulators log what matters themselves.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        return _run(args)
    except KeyboardInterrupt:  # a sender or consumer stopped mid-way
        print(f"gateway simulate {args.kind}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.kind == "pacs":
        return _run_pacs(args)
    if args.kind == "modality":
        return _run_modality(args)
    if args.kind == "study":
        return _run_study(args)
    if args.kind == "hl7-receiver":
        return _run_hl7_receiver(args)
    if args.kind == "hl7-sender":
        return _run_hl7_sender(args)
    if args.kind in ("xds-registry", "xds-repository"):
        return _run_xds(args)
    if args.kind == "audit-repository":
        return _run_audit_repository(args)
    if args.kind == "xds-consumer":
        return _run_xds_consumer(args)
    return 3


def _run_xds_consumer(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.xds_consumer import ConsumerError, XdsConsumer

    if not args.patient and not args.retrieve:
        print("gateway simulate xds-consumer: give --patient (ITI-18; with --provide, ITI-41 "
              "first), --retrieve (ITI-43) or both", file=sys.stderr)
        return 3
    if args.provide and not args.patient:
        print("gateway simulate xds-consumer: --provide needs --patient (the document's "
              "patient, CX)", file=sys.stderr)
        return 3
    if args.retrieve and not args.repository:
        print("gateway simulate xds-consumer: --retrieve needs --repository (the document's "
              "repositoryUniqueId)", file=sys.stderr)
        return 3
    base = args.url.rstrip("/")
    consumer = XdsConsumer(f"{base}/registry", f"{base}/repository", args.timeout)
    ok = True
    try:
        if args.provide:
            provided = consumer.provide(args.provide.read_bytes(), args.mime_type or (
                mimetypes.guess_type(args.provide.name)[0] or "application/octet-stream"),
                args.patient)
            print(f"ITI-41 {provided.status.rsplit(':', 1)[-1]}: {args.provide.name} as "
                  f"document {provided.unique_id}")
            for error in provided.errors:
                print(f"  error {error}")
            ok = provided.success
        if args.patient:
            found = consumer.find_documents(args.patient)
            print(f"ITI-18 {found.status.rsplit(':', 1)[-1]}: {len(found.refs)} document(s)")
            for ref in found.refs:
                print(f"  {ref}")
            for error in found.errors:
                print(f"  error {error}")
            ok = ok and found.success
        if args.retrieve:
            retrieved = consumer.retrieve(args.repository, args.retrieve)
            print(f"ITI-43 {retrieved.status.rsplit(':', 1)[-1]}: "
                  f"{len(retrieved.documents)} document(s)")
            for document in retrieved.documents:
                print(f"  {document.unique_id} {document.mime_type} "
                      f"{len(document.content)} bytes")
                if args.save:
                    args.save.write_bytes(document.content)
            for error in retrieved.errors:
                print(f"  error {error}")
            ok = ok and retrieved.success
    except ConsumerError as exc:
        print(f"gateway simulate xds-consumer: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway simulate xds-consumer: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _server_tls(args: argparse.Namespace):
    """A server-side TLS context from --tls-cert/--tls-key (and --tls-ca: client certificates
    required), or None for plain TCP."""
    if not getattr(args, "tls_cert", None):
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            context.load_verify_locations(args.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        print(f"gateway simulate {args.kind}: TLS: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        raise SystemExit(3) from None
    return context


def _received(number: int, received: list[int], stop: threading.Event) -> None:
    received.append(number)
    stop.set()


def _wait_for_signal() -> int:
    """Block until SIGTERM or SIGINT; returns which."""
    received: list[int] = []
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: _received(number, received, stop))
    # Poll: the kernel may deliver the signal to one of pynetdicom's threads, and then an
    # untimed wait in the main thread would never return to run the Python handler.
    while not stop.wait(0.2):
        pass
    return received[0]


def _address(text: str, flag: str):
    try:
        return parse_address(text)
    except ValueError as exc:
        print(f"gateway simulate: {flag}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None


def _serve(kind: str, server, address, summary) -> int:
    """Start a simulated server, say READY, run until SIGTERM/SIGINT, then print `summary()`."""
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"gateway simulate {kind}: cannot listen on {address}: {reason}", file=sys.stderr)
        return 1
    print(f"READY {address.host}:{server.port}", flush=True)
    try:
        signum = _wait_for_signal()
    finally:
        server.stop()
    print(summary(), flush=True)
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 0


def _run_pacs(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.pacs import PacsSimulator

    address = _address(args.listen, "--listen")
    if args.store_dir is not None:
        args.store_dir.mkdir(parents=True, exist_ok=True)
    pacs = PacsSimulator(ae_title=args.ae_title, host=address.host, port=address.port,
                         store_dir=args.store_dir, reject=args.reject,
                         abort_after=args.abort_after, hang=args.hang)
    return _serve("pacs", pacs, address, lambda: f"stored {pacs.stored_count()} instance(s), "
                                                  f"answered {pacs.echoes} echo(es)")


def _run_modality(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.modality import load_instances, make_instances, send

    address = _address(args.target, "HOST:PORT")
    datasets = load_instances(args.files) if args.files else make_instances(args.count)
    results = send(address.host, address.port, datasets, called_ae=args.called_ae,
                   calling_ae=args.calling_ae, timeout=args.timeout)
    for result in results:
        outcome = "stored" if result.stored else (
            f"status 0x{result.status:04x}" if result.status is not None else result.error)
        print(f"{result.sop_instance_uid} {outcome}")
    stored = sum(result.stored for result in results)
    print(f"{stored} of {len(results)} stored", flush=True)
    return 0 if stored == len(results) else 1


def _run_study(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.study import write_study

    try:
        paths = write_study(args.folder, args.images, args.modality)
    except OSError as exc:
        print(f"gateway simulate study: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{len(paths)} {args.modality} image(s) of one study in {args.folder}", flush=True)
    return 0


def _run_hl7_receiver(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.hl7 import HL7Receiver

    address = _address(args.listen, "--listen")
    receiver = HL7Receiver(name=args.name, host=address.host, port=address.port, mode=args.mode,
                           delay=args.delay, record=args.record, validate=args.validate,
                           parse=args.parse)
    receiver.tls = _server_tls(args)
    return _serve("hl7-receiver", receiver, address,
                  lambda: f"received {len(receiver.control_ids)} message(s)")


def _run_hl7_sender(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.hl7 import send_messages
    from gateway.testing.simulators.hl7_messages import make_messages

    address = _address(args.target, "HOST:PORT")
    messages = make_messages(args.count, args.message_type, args.patients, args.prefix)
    tls = None
    if args.tls_ca:
        import ssl
        tls = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        results = send_messages(address.host, address.port, messages, timeout=args.timeout,
                                tls=tls)
    except OSError as exc:
        print(f"gateway simulate hl7-sender: cannot connect to {address}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    for result in results:
        print(f"{result.control_id} {result.code or '-'} {result.error}".rstrip())
    accepted = sum(result.code in ("AA", "CA") for result in results)
    print(f"{accepted} of {len(results)} accepted", flush=True)
    return 0 if accepted == len(results) else 1


def _run_xds(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.xds import XdsRegistry, XdsRepository

    address = _address(args.listen, "--listen")
    server: XdsRegistry | XdsRepository
    if args.kind == "xds-registry":
        server = XdsRegistry(host=address.host, port=address.port, mode=args.mode)
    else:
        server = XdsRepository(host=address.host, port=address.port, mode=args.mode,
                               registry_url=args.registry, store_dir=args.store_dir)
    server.tls = _server_tls(args)
    return _serve(args.kind, server, address,
                  lambda: f"answered {len(server.requests)} request(s)")


def _run_audit_repository(args: argparse.Namespace) -> int:
    from gateway.testing.simulators.audit_repository import AuditRepository

    address = _address(args.listen, "--listen")
    repository = AuditRepository(host=address.host, port=address.port, save=args.save)
    repository.tls = _server_tls(args)
    return _serve("audit-repository", repository, address,
                  lambda: f"received {len(repository.received())} audit message(s)")
