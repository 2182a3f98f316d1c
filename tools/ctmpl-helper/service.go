package main

import (
	"strings"

	"github.com/hashicorp/consul-template/dependency"
)

// serviceCalls is consul-template's `service` function with its work done once per argument
// rather than at every call. consul-template parses the argument (regular expressions) and
// formats the query's name five times (fmt.Sprintf) at each call: a template ranging over
// 200 services spends a third of its render there. Here the parsed query and its name are
// kept; what a call returns, and records as used and missing, is what consul-template's
// does (the equivalence suite in tests/ holds both to the same bytes).
type serviceCalls struct {
	queries map[string]namedQuery
	// The render running: what it used and what it found no data for.
	used, missing *dependency.Set
}

// namedQuery is a parsed `service` query whose name is computed once: the brain and the sets
// look a dependency up by its String().
type namedQuery struct {
	*dependency.HealthServiceQuery
	name string
}

func (q namedQuery) String() string { return q.name }

// A template computing endless distinct arguments must not grow the cache for ever.
const maxServiceQueries = 4096

func newServiceCalls() *serviceCalls {
	return &serviceCalls{queries: map[string]namedQuery{}}
}

// start gives each render its own sets.
func (c *serviceCalls) start() {
	c.used, c.missing = &dependency.Set{}, &dependency.Set{}
}

func (c *serviceCalls) call(h *helper) func(...string) ([]*dependency.HealthService, error) {
	return func(s ...string) ([]*dependency.HealthService, error) {
		result := []*dependency.HealthService{}
		if len(s) == 0 || s[0] == "" {
			return result, nil
		}
		key := strings.Join(s, "|")
		q, ok := c.queries[key]
		if !ok {
			parsed, err := dependency.NewHealthServiceQuery(key)
			if err != nil {
				return nil, err
			}
			if len(c.queries) >= maxServiceQueries {
				clear(c.queries)
			}
			q = namedQuery{parsed, parsed.String()}
			c.queries[key] = q
		}
		c.used.Add(q)
		if value, ok := h.brain.Recall(q); ok {
			return value.([]*dependency.HealthService), nil
		}
		c.missing.Add(q)
		return result, nil
	}
}
