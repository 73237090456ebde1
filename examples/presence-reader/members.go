package main

// The pure part: a channel's presence entries as the registry holds them
// (docs/protocol.md section 10), folded into members, and the joins and leaves that
// follow from each change. No NATS here: members_test.go checks it.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
)

// valueVersion is the `v` this reader knows; a value of another version is skipped.
const valueVersion = 1

// WatchFilter is the KV key filter of one channel's entries, `pres.<channel>.>`, the
// channel in base64url without padding (a channel may hold characters a key refuses).
func WatchFilter(channel string) string {
	return "pres." + base64.RawURLEncoding.EncodeToString([]byte(channel)) + ".>"
}

// Entry is the value of `pres.<channel>.<relay>.<connection>`: one connection's membership.
// Fields this reader does not know are ignored.
type Entry struct {
	V       int             `json:"v"`
	Channel string          `json:"channel"`
	Key     string          `json:"key"`
	Info    json.RawMessage `json:"info"`
	Since   int64           `json:"since"`
}

// ParseEntry reads a value of `channel`'s entries; an error for anything else (the reader
// skips it rather than guess).
func ParseEntry(value []byte, channel string) (Entry, error) {
	var e Entry
	if err := json.Unmarshal(value, &e); err != nil {
		return Entry{}, fmt.Errorf("not a presence value: %w", err)
	}
	switch {
	case e.V != valueVersion:
		return Entry{}, fmt.Errorf("value version %d, this reader knows %d", e.V, valueVersion)
	case e.Channel != channel:
		return Entry{}, fmt.Errorf("value of channel %q under %q's key", e.Channel, channel)
	case e.Key == "":
		return Entry{}, errors.New("value without a member key")
	}
	// What the others see of a member is a JSON object; anything else counts as none.
	if t := bytes.TrimSpace(e.Info); len(t) == 0 || t[0] != '{' {
		e.Info = json.RawMessage(`{}`)
	}
	return e, nil
}

// Member is one distinct member key, its info and its connections now.
type Member struct {
	Key     string          `json:"key"`
	Info    json.RawMessage `json:"info"`
	Clients int             `json:"clients"`
}

// Change is a join (a key's first connection) or a leave (its last one gone).
type Change struct {
	Event string          `json:"event"`
	Key   string          `json:"key"`
	Info  json.RawMessage `json:"info"`
}

// Members folds one channel's entries, by KV key (one per connection), into members.
type Members struct {
	conns   map[string]string          // KV key -> member key
	clients map[string]int             // member key -> its connections
	info    map[string]json.RawMessage // member key -> the info of its latest entry
}

func NewMembers() *Members {
	return &Members{
		conns:   map[string]string{},
		clients: map[string]int{},
		info:    map[string]json.RawMessage{},
	}
}

// Put applies a connection's entry written (or written again); the join it makes, if any.
func (m *Members) Put(kvKey string, e Entry) []Change {
	var out []Change
	if old, ok := m.conns[kvKey]; ok {
		if old == e.Key {
			m.info[e.Key] = e.Info // the same connection written again (e.g. after a registry loss)
			return nil
		}
		out = m.Delete(kvKey) // not what the relays write, but then it is another member's
	}
	m.conns[kvKey] = e.Key
	m.clients[e.Key]++
	m.info[e.Key] = e.Info
	if m.clients[e.Key] == 1 {
		out = append(out, Change{Event: "join", Key: e.Key, Info: e.Info})
	}
	return out
}

// Delete applies a connection's entry deleted (or purged); the leave it makes, if any. A
// delete of an entry this reader never held (an old delete marker) changes nothing.
func (m *Members) Delete(kvKey string) []Change {
	key, ok := m.conns[kvKey]
	if !ok {
		return nil
	}
	delete(m.conns, kvKey)
	m.clients[key]--
	if m.clients[key] > 0 {
		return nil
	}
	info := m.info[key]
	delete(m.clients, key)
	delete(m.info, key)
	return []Change{{Event: "leave", Key: key, Info: info}}
}

// List is the members in byte order of key (never nil: it prints as `[]`).
func (m *Members) List() []Member {
	out := make([]Member, 0, len(m.clients))
	for key, n := range m.clients {
		out = append(out, Member{Key: key, Info: m.info[key], Clients: n})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}
