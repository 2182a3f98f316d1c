// Command dcy-ctmpl renders consul-template templates (Go text/template syntax) for
// dcy-template, with consul-template's own template package, so that a `.ctmpl` file renders
// the same bytes as under consul-template.
//
// It never talks to Consul: dcy-template's watch engine fetches the data and sends it here.
// One process serves every Go-syntax template of one renderer. Requests are JSON, one per
// line, on stdin; replies are a JSON header line on stdout, followed for a rendered template
// by its output as raw bytes (the header says how many):
//
//	-> {"op":"render","id":"t1","text":"...","err_missing_key":false,
//	    "data":[{"dep":"health.service(web|passing)","raw":<Consul's JSON body>}, ...]}
//	<- {"output":52311,"used":["health.service(web|passing)"],"missing":[]}\n<52311 bytes>
//	<- {"error":"template: :3:5: executing ..."}
//	-> {"op":"drop","id":"t1"}
//	<- {}
//
// "text" is sent when the source is new or changed; "data" holds the answers that are new
// since the helper last saw that dependency (the store is shared by all templates). "used"
// and "missing" are the dependencies the render touched and those it found no data for, in
// consul-template's own names (the String() of its dependency types); each is left out when
// it is the same list as in that template's previous rendered reply (a render answered with
// "error" does not count; "drop" forgets the template). The output is what the template
// wrote, except that bytes that are not UTF-8 are each replaced by U+FFFD, as encoding/json
// would (dcy-template writes text).
//
// While a render runs, env() and file() ask dcy-template (which applies its env policy and
// sandbox rules) with a callback on the same pipes, one JSON line each way:
//
//	<- {"call":"env","arg":"APP_NAME"}
//	-> {"value":"..."} or {"error":"..."}
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/hashicorp/consul-template/dependency"
	ctemplate "github.com/hashicorp/consul-template/template"
	"github.com/hashicorp/consul/api"
)

type datum struct {
	Dep string          `json:"dep"`
	Raw json.RawMessage `json:"raw"`
}

type request struct {
	Op            string  `json:"op"`
	ID            string  `json:"id"`
	Text          *string `json:"text,omitempty"`
	ErrMissingKey bool    `json:"err_missing_key"`
	Data          []datum `json:"data"`
}

// reply is the header line; a rendered template's output follows it (Output bytes).
type reply struct {
	Output  *int      `json:"output,omitempty"`
	Used    *[]string `json:"used,omitempty"`
	Missing *[]string `json:"missing,omitempty"`
	Error   string    `json:"error,omitempty"`
	body    []byte
}

// lists are what a template's previous rendered reply said it used and missed.
type lists struct {
	used, missing []string
}

type callback struct {
	Call    string  `json:"call"`
	Arg     string  `json:"arg"`
	Default *string `json:"default,omitempty"`
}

type answer struct {
	Value string `json:"value"`
	Error string `json:"error"`
}

// Functions that would reach outside what dcy-template watches, run programs or write files:
// refused with an error naming them (consul-template's own denylist says only "function is
// disabled").
var refused = map[string]string{
	"plugin":      "it runs programs",
	"writeToFile": "it writes files outside the template's destination",
	// Each call starts a new execution, out of text/template's depth limit: a template that
	// calls itself recurses until the helper runs out of stack (a gigabyte).
	"executeTemplate":  "its recursion is unbounded; use {{ template \"name\" . }}",
	"secret":           "Vault is not supported",
	"secrets":          "Vault is not supported",
	"pkiCert":          "Vault is not supported",
	"caLeaf":           "Connect certificates are not supported",
	"caRoots":          "Connect certificates are not supported",
	"connect":          "Connect services are not supported",
	"exportedServices": "admin partitions are not supported",
	"importedServices": "admin partitions are not supported",
	"partitions":       "admin partitions are not supported",
	"peerings":         "cluster peering is not supported",
	"nomadService":     "Nomad is not supported",
	"nomadServices":    "Nomad is not supported",
	"nomadVar":         "Nomad is not supported",
	"nomadVarExists":   "Nomad is not supported",
	"nomadVarList":     "Nomad is not supported",
	"nomadVarListSafe": "Nomad is not supported",
	"sprig_env":        "use env, which applies dcy-template's env policy",
	"sprig_expandenv":  "use env, which applies dcy-template's env policy",
}

type helper struct {
	in        *bufio.Reader
	out       *bufio.Writer
	brain     *ctemplate.Brain
	templates map[string]*ctemplate.Template
	texts     map[string]string
	last      map[string]lists
	funcs     map[string]any
	services  *serviceCalls
}

// A render of a big template allocates about as much as the whole data it ranges over (200
// services × 5 instances: 0.75 MB); at Go's default GOGC of 100 and a heap of a few MB, a
// collection ran during every second render, on the way from a change to its file. At 400 it
// runs every ~17 renders (that template's render p90 −25 %, one change per 10 ms), and the
// heap may grow to five times the live data (its peak there: 22 → 35 MB).
const gcPercent = 400

func main() {
	debug.SetGCPercent(gcPercent)
	h := &helper{
		in:        bufio.NewReaderSize(os.Stdin, 1<<20),
		out:       bufio.NewWriterSize(os.Stdout, 1<<20),
		brain:     ctemplate.NewBrain(),
		templates: map[string]*ctemplate.Template{},
		texts:     map[string]string{},
		last:      map[string]lists{},
		services:  newServiceCalls(),
	}
	h.funcs = h.extensions()
	for {
		line, err := h.in.ReadBytes('\n')
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return
		}
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintln(os.Stderr, "dcy-ctmpl:", err)
			os.Exit(1)
		}
		var req request
		if err := json.Unmarshal(line, &req); err != nil {
			h.send(reply{Error: "dcy-ctmpl: bad request: " + err.Error()})
			continue
		}
		r := h.handle(&req)
		h.write(&r)
	}
}

// write sends a reply: its header line, then the output, in one flush.
func (h *helper) write(r *reply) {
	data, err := json.Marshal(r)
	if err != nil {
		data, _ = json.Marshal(reply{Error: "dcy-ctmpl: " + err.Error()})
		r.body = nil
	}
	h.out.Write(data)
	h.out.WriteByte('\n')
	h.out.Write(r.body)
	h.out.Flush()
}

func (h *helper) send(v any) {
	data, err := json.Marshal(v)
	if err != nil {
		data, _ = json.Marshal(reply{Error: "dcy-ctmpl: " + err.Error()})
	}
	h.out.Write(data)
	h.out.WriteByte('\n')
	h.out.Flush()
}

func (h *helper) handle(req *request) reply {
	switch req.Op {
	case "drop":
		delete(h.templates, req.ID)
		delete(h.texts, req.ID)
		delete(h.last, req.ID)
		return reply{}
	case "render":
	default:
		return reply{Error: fmt.Sprintf("dcy-ctmpl: unknown op %q", req.Op)}
	}
	for _, d := range req.Data {
		value, err := convert(d.Dep, d.Raw)
		if err != nil {
			return reply{Error: fmt.Sprintf("dcy-ctmpl: data for %s: %v", d.Dep, err)}
		}
		h.brain.ForceSet(d.Dep, value)
	}
	if req.Text != nil {
		h.texts[req.ID] = *req.Text
		delete(h.templates, req.ID)
	}
	text, ok := h.texts[req.ID]
	if !ok {
		return reply{Error: "dcy-ctmpl: no text for template " + req.ID}
	}
	if text == "" {
		return h.rendered(req.ID, nil, []string{}, []string{})
	}
	tmpl, ok := h.templates[req.ID]
	if !ok {
		var err error
		tmpl, err = ctemplate.NewTemplate(&ctemplate.NewTemplateInput{
			Contents:      text,
			ErrMissingKey: req.ErrMissingKey,
			ExtFuncMap:    h.funcs,
		})
		if err != nil {
			return reply{Error: err.Error()}
		}
		h.templates[req.ID] = tmpl
	}
	h.services.start()
	result, err := tmpl.Execute(&ctemplate.ExecuteInput{Brain: h.brain})
	if err != nil {
		return reply{Error: err.Error()}
	}
	used := names(result.Used, h.services.used)
	missing := names(result.Missing, h.services.missing)
	return h.rendered(req.ID, validUTF8(result.Output), used, missing)
}

// rendered is the reply for an output; the lists only where they changed for this template.
func (h *helper) rendered(id string, output []byte, used, missing []string) reply {
	size := len(output)
	r := reply{Output: &size, body: output}
	last, seen := h.last[id]
	if !seen || !slices.Equal(last.used, used) {
		r.Used = &used
	}
	if !seen || !slices.Equal(last.missing, missing) {
		r.Missing = &missing
	}
	h.last[id] = lists{used: used, missing: missing}
	return r
}

// validUTF8 replaces each byte that is not part of UTF-8 with U+FFFD, as encoding/json did
// when the output travelled as a JSON string (so that the bytes written stay the same).
func validUTF8(b []byte) []byte {
	if utf8.Valid(b) {
		return b
	}
	out := make([]byte, 0, len(b)+16)
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		if r == utf8.RuneError && size == 1 {
			out = append(out, "\uFFFD"...)
		} else {
			out = append(out, b[:size]...)
		}
		b = b[size:]
	}
	return out
}

// names lists the dependencies of consul-template's set and then those of `service` calls.
func names(set, services *dependency.Set) []string {
	out := make([]string, 0, set.Len()+services.Len())
	for _, d := range set.List() {
		out = append(out, d.String())
	}
	for _, d := range services.List() {
		if set.Get(d.String()) == nil {
			out = append(out, d.String())
		}
	}
	return out
}

// ask sends a callback to dcy-template and waits for its answer.
func (h *helper) ask(call, arg string, def *string) (string, error) {
	h.send(callback{Call: call, Arg: arg, Default: def})
	line, err := h.in.ReadBytes('\n')
	if err != nil {
		return "", fmt.Errorf("%s: no answer from dcy-template: %v", call, err)
	}
	var a answer
	if err := json.Unmarshal(line, &a); err != nil {
		return "", fmt.Errorf("%s: bad answer from dcy-template: %v", call, err)
	}
	if a.Error != "" {
		return "", errors.New(a.Error)
	}
	return a.Value, nil
}

func (h *helper) extensions() map[string]any {
	funcs := map[string]any{
		"service": h.services.call(h),
		"env":     func(name string) (string, error) { return h.ask("env", name, nil) },
		"envOrDefault": func(name, def string) (string, error) {
			return h.ask("env", name, &def)
		},
		"mustEnv": func(name string) (string, error) {
			value, err := h.ask("env", name, nil)
			if err == nil && value == "" {
				err = fmt.Errorf("required environment variable %s is empty", name)
			}
			return value, err
		},
		"file": func(path string) (string, error) {
			if path == "" {
				return "", nil
			}
			return h.ask("file", strings.TrimSpace(path), nil)
		},
	}
	for name, why := range refused {
		funcs[name] = refuse(name, why)
	}
	return funcs
}

func refuse(name, why string) func(...any) (string, error) {
	return func(...any) (string, error) {
		return "", fmt.Errorf("%s is not supported by dcy-template: %s", name, why)
	}
}

// convert turns the body Consul answered for a dependency into the value consul-template's
// dependency package would have produced for it.
func convert(dep string, raw json.RawMessage) (any, error) {
	switch {
	case strings.HasPrefix(dep, "health.service("):
		return healthServices(dep, raw)
	case dep == "catalog.services" || strings.HasPrefix(dep, "catalog.services("):
		return catalogServices(raw)
	case dep == "catalog.nodes" || strings.HasPrefix(dep, "catalog.nodes("):
		return catalogNodes(dep, raw)
	case dep == "catalog.node" || strings.HasPrefix(dep, "catalog.node("):
		return catalogNode(raw)
	case strings.HasPrefix(dep, "kv.list("):
		// dcy-template sends these already in consul-template's shape.
		pairs := []*dependency.KeyPair{}
		err := json.Unmarshal(raw, &pairs)
		return pairs, err
	case strings.HasPrefix(dep, "kv.get("), strings.HasPrefix(dep, "kv.block("):
		var value *string
		if err := json.Unmarshal(raw, &value); err != nil {
			return nil, err
		}
		if value == nil {
			return nil, nil // the template sees an untyped nil: "no such key"
		}
		return *value, nil
	case dep == "catalog.datacenters":
		names := []string{}
		err := json.Unmarshal(raw, &names)
		return names, err
	}
	return nil, fmt.Errorf("unknown dependency")
}

func healthServices(dep string, raw json.RawMessage) (any, error) {
	var entries []*api.ServiceEntry
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, err
	}
	// The filters are the part after the last "|" (the String() form always has one).
	inner := strings.TrimSuffix(strings.TrimPrefix(dep, "health.service("), ")")
	filters := []string{dependency.HealthPassing}
	if i := strings.LastIndex(inner, "|"); i >= 0 {
		filters = strings.Split(inner[i+1:], ",")
	}
	list := make([]*dependency.HealthService, 0, len(entries))
	for _, entry := range entries {
		if entry.Node == nil || entry.Service == nil {
			continue
		}
		status := entry.Checks.AggregatedStatus()
		if !accepts(filters, status) {
			continue
		}
		address := entry.Service.Address
		if address == "" {
			address = entry.Node.Address
		}
		list = append(list, &dependency.HealthService{
			Node:                   entry.Node.Node,
			NodeID:                 entry.Node.ID,
			NodeAddress:            entry.Node.Address,
			NodeTaggedAddresses:    entry.Node.TaggedAddresses,
			NodeMeta:               entry.Node.Meta,
			ServiceMeta:            entry.Service.Meta,
			Address:                address,
			ServiceTaggedAddresses: entry.Service.TaggedAddresses,
			ID:                     entry.Service.ID,
			Name:                   entry.Service.Service,
			Tags:                   sortedTags(entry.Service.Tags),
			Status:                 status,
			Checks:                 entry.Checks,
			Port:                   entry.Service.Port,
			Weights:                entry.Service.Weights,
		})
	}
	if !strings.Contains(inner, "~") {
		sort.Stable(dependency.ByNodeThenID(list))
	}
	return list, nil
}

func accepts(filters []string, status string) bool {
	for _, f := range filters {
		if f == status || f == dependency.HealthAny {
			return true
		}
	}
	return false
}

func sortedTags(tags []string) dependency.ServiceTags {
	out := make([]string, len(tags))
	copy(out, tags)
	sort.Strings(out)
	return dependency.ServiceTags(out)
}

func catalogServices(raw json.RawMessage) (any, error) {
	var entries map[string][]string
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, err
	}
	var list []*dependency.CatalogSnippet
	for name, tags := range entries {
		list = append(list, &dependency.CatalogSnippet{Name: name, Tags: sortedTags(tags)})
	}
	sort.Stable(dependency.ByName(list))
	return list, nil
}

func catalogNodes(dep string, raw json.RawMessage) (any, error) {
	var entries []*api.Node
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, err
	}
	list := make([]*dependency.Node, 0, len(entries))
	for _, n := range entries {
		list = append(list, node(n))
	}
	if !strings.Contains(dep, "~") {
		sort.Stable(dependency.ByNode(list))
	}
	return list, nil
}

func node(n *api.Node) *dependency.Node {
	return &dependency.Node{
		ID:              n.ID,
		Node:            n.Node,
		Address:         n.Address,
		Datacenter:      n.Datacenter,
		TaggedAddresses: n.TaggedAddresses,
		Meta:            n.Meta,
	}
}

func catalogNode(raw json.RawMessage) (any, error) {
	var entry *api.CatalogNode
	if err := json.Unmarshal(raw, &entry); err != nil {
		return nil, err
	}
	if entry == nil || entry.Node == nil {
		return &dependency.CatalogNode{}, nil
	}
	services := make([]*dependency.CatalogNodeService, 0, len(entry.Services))
	for _, s := range entry.Services {
		services = append(services, &dependency.CatalogNodeService{
			ID:                s.ID,
			Service:           s.Service,
			Tags:              sortedTags(s.Tags),
			Meta:              s.Meta,
			Port:              s.Port,
			Address:           s.Address,
			EnableTagOverride: s.EnableTagOverride,
		})
	}
	sort.Stable(dependency.ByService(services))
	return &dependency.CatalogNode{Node: node(entry.Node), Services: services}, nil
}
