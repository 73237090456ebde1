// authz-backend is an example of the backend a wsrelay binding's `authorize.request` (and
// `auth.connectRequest`) asks over NATS request-reply: it serves one subject in a queue group,
// decides from an in-memory table, and logs one JSON line per decision. See README.md.
//
//	authz-backend -nats nats://127.0.0.1:4222 -rooms 'alice:1,2;bob:2' -orders '42:alice:shipped' -banned mallory
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// drainTimeout bounds the shutdown: requests in flight are answered, then the connection closes.
const drainTimeout = 10 * time.Second

type options struct {
	natsURL, subject, queue string
	rooms, orders, banned   string
}

func envOr(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}

func main() {
	var o options
	flag.StringVar(&o.natsURL, "nats", envOr("NATS_URL", nats.DefaultURL), "NATS server URL (env NATS_URL)")
	flag.StringVar(&o.subject, "subject", envOr("AUTHZ_SUBJECT", "authz.example"), "the subject the relay's authorize.request names (env AUTHZ_SUBJECT)")
	flag.StringVar(&o.queue, "queue", envOr("AUTHZ_QUEUE", "wsrelay-authz"), "queue group: replicas share the requests (env AUTHZ_QUEUE)")
	flag.StringVar(&o.rooms, "rooms", envOr("ROOMS", ""), "who may join which room: 'alice:1,2;bob:2' (env ROOMS)")
	flag.StringVar(&o.orders, "orders", envOr("ORDERS", ""), "orders, their owner and state: '42:alice:shipped;43:bob:open' (env ORDERS)")
	flag.StringVar(&o.banned, "banned", envOr("BANNED", ""), "users refused at connect: 'mallory,trudy' (env BANNED)")
	flag.Parse()

	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := run(o, log); err != nil {
		log.Error("exiting", "error", err.Error())
		os.Exit(1)
	}
}

func run(o options, log *slog.Logger) error {
	table, err := newTable(o)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	closed := make(chan struct{})
	nc, err := nats.Connect(o.natsURL,
		nats.Name("wsrelay-authz-example"),
		// NATS may come up after this pod: keep trying rather than crash-loop.
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.DrainTimeout(drainTimeout),
		nats.ConnectHandler(func(*nats.Conn) { log.Info("connected", "url", o.natsURL) }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil { // nil: our own close, after a drain
				log.Warn("disconnected", "error", err.Error())
			}
		}),
		nats.ReconnectHandler(func(*nats.Conn) { log.Info("reconnected") }),
		nats.ClosedHandler(func(*nats.Conn) { close(closed) }),
	)
	if err != nil {
		return fmt.Errorf("nats connect %s: %w", o.natsURL, err)
	}

	if _, err := nc.QueueSubscribe(o.subject, o.queue, func(m *nats.Msg) { answer(m, table, log) }); err != nil {
		nc.Close()
		return fmt.Errorf("subscribe %s: %w", o.subject, err)
	}
	// Once the server has the subscription, requests reach us: say so (tests wait for it).
	if err := nc.FlushTimeout(5 * time.Second); err == nil {
		log.Info("serving", "subject", o.subject, "queue", o.queue, "url", nc.ConnectedUrlRedacted())
	} else {
		log.Warn("not connected yet, serving once connected", "subject", o.subject, "error", err.Error())
	}

	select {
	case <-ctx.Done():
		// Drain: stop taking new requests, answer those already received, then close.
		log.Info("draining", "timeout", drainTimeout.String())
		if err := nc.Drain(); err != nil {
			nc.Close()
			return fmt.Errorf("drain: %w", err)
		}
		select {
		case <-closed:
		case <-time.After(drainTimeout + time.Second):
			nc.Close()
			return errors.New("drain did not finish in time")
		}
		log.Info("stopped")
		return nil
	case <-closed:
		return errors.New("nats connection closed")
	}
}

func newTable(o options) (*Table, error) {
	rooms, err := ParseRooms(o.rooms)
	if err != nil {
		return nil, err
	}
	orders, err := ParseOrders(o.orders)
	if err != nil {
		return nil, err
	}
	return &Table{Rooms: rooms, Orders: orders, Banned: ParseBanned(o.banned)}, nil
}

// answer replies to one request and logs the decision.
func answer(m *nats.Msg, table *Table, log *slog.Logger) {
	start := time.Now()
	req, reply, parseErr := table.DecideBytes(m.Data)

	// The relay's headers say who asks even when the body cannot be read.
	sub, _ := req.Claims["sub"].(string)
	if h := m.Header.Get("Wsrelay-Sub"); h != "" {
		sub = h
	}
	connection := req.Connection
	if h := m.Header.Get("Wsrelay-Connection"); h != "" {
		connection = h
	}
	attrs := []any{
		"op", req.Op, "channel", req.Channel, "sub", sub, "connection", connection,
		"allow", reply.Allow,
	}
	if !reply.Allow {
		attrs = append(attrs, "reason", reply.Reason, "code", reply.Code)
	}

	var sendErr error
	if m.Reply == "" {
		sendErr = errors.New("request without a reply subject")
	} else {
		body, err := json.Marshal(reply)
		if err == nil {
			err = m.Respond(body)
		}
		sendErr = err
	}
	attrs = append(attrs, "micros", time.Since(start).Microseconds())
	if sendErr != nil {
		attrs = append(attrs, "send_error", sendErr.Error())
	}
	switch {
	case parseErr != nil:
		log.Warn("malformed request", append(attrs, "error", parseErr.Error(), "bytes", len(m.Data))...)
	case sendErr != nil:
		log.Error("decision not sent", attrs...)
	default:
		log.Info("decision", attrs...)
	}
}
