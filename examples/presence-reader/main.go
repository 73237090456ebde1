// presence-reader is an example of a backend reading a wsrelay channel's presence with plain
// NATS, from the relays' registry bucket (docs/protocol.md section 10), without any API of
// the relays: it prints the channel's members, then one JSON line per join and leave, on
// stdout. See README.md.
//
//	presence-reader -nats nats://127.0.0.1:4222 -bucket "$BUCKET" -channel rooms.7
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// setupTimeout bounds finding the bucket and starting the watch.
const setupTimeout = 10 * time.Second

type options struct {
	natsURL, bucket, channel string
	verbose                  bool
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
	flag.StringVar(&o.bucket, "bucket", envOr("REGISTRY_BUCKET", ""), "the relays' registry bucket: the gateway's status.registry.bucket (env REGISTRY_BUCKET)")
	flag.StringVar(&o.channel, "channel", "", "the channel, as clients name it: rooms.7")
	flag.BoolVar(&o.verbose, "v", false, "log every entry read on stderr")
	flag.Parse()

	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := run(o, os.Stdout, log); err != nil {
		log.Error("exiting", "error", err.Error())
		os.Exit(1)
	}
}

func run(o options, stdout io.Writer, log *slog.Logger) error {
	if o.bucket == "" || o.channel == "" {
		return errors.New("-bucket and -channel are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	nc, err := nats.Connect(o.natsURL, nats.Name("wsrelay-presence-reader"), nats.MaxReconnects(-1))
	if err != nil {
		return fmt.Errorf("nats connect %s: %w", o.natsURL, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	setup, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	kv, err := js.KeyValue(setup, o.bucket)
	if err != nil {
		return fmt.Errorf("bucket %s: %w", o.bucket, err)
	}
	// The watch first delivers every entry there is (then a nil), then each change. It
	// lives as long as ctx: an ordered consumer that nats.go recreates after a reconnect.
	filter := WatchFilter(o.channel)
	w, err := kv.Watch(ctx, filter)
	if err != nil {
		return fmt.Errorf("watch %s: %w", filter, err)
	}
	defer func() { _ = w.Stop() }()
	log.Info("watching", "bucket", o.bucket, "channel", o.channel, "filter", filter)

	out := json.NewEncoder(stdout)
	out.SetEscapeHTML(false)
	members := NewMembers()
	initial := true
	for {
		select {
		case <-ctx.Done():
			log.Info("stopped")
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("the watch ended")
			}
			if e == nil { // the entries there were are read: the members now
				initial = false
				if err := out.Encode(map[string]any{"event": "members", "members": members.List()}); err != nil {
					return err
				}
				continue
			}
			for _, c := range apply(members, e, o, log) {
				if !initial {
					if err := out.Encode(c); err != nil {
						return err
					}
				}
			}
		}
	}
}

// apply folds one watch entry into members; the joins and leaves it makes.
func apply(members *Members, e jetstream.KeyValueEntry, o options, log *slog.Logger) []Change {
	switch e.Operation() {
	case jetstream.KeyValuePut:
		entry, err := ParseEntry(e.Value(), o.channel)
		if o.verbose {
			log.Info("entry", "op", "put", "kvKey", e.Key(), "revision", e.Revision(), "value", loggable(e.Value()))
		}
		if err != nil {
			log.Warn("skipped", "kvKey", e.Key(), "error", err.Error())
			return nil
		}
		return members.Put(e.Key(), entry)
	default: // a delete or a purge: that connection's membership is gone
		if o.verbose {
			op := "delete"
			if e.Operation() == jetstream.KeyValuePurge {
				op = "purge"
			}
			log.Info("entry", "op", op, "kvKey", e.Key(), "revision", e.Revision())
		}
		return members.Delete(e.Key())
	}
}

// loggable is a value as JSON in the log when it is JSON, else as a string.
func loggable(v []byte) any {
	if json.Valid(v) {
		return json.RawMessage(v)
	}
	return string(v)
}
