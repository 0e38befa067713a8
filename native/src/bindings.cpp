// Python binding of ajn::SuffixTree (nanobind). Arguments are checked here the way
// arctic_jax/speculative/suffix_tree.py checks them (ValueError naming the problem); token lists are
// read straight from list/tuple objects and a draft comes back as one plain tuple, so a call costs
// one boundary crossing and no per-token callbacks.
#include <nanobind/nanobind.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "suffix_tree.h"

namespace nb = nanobind;

namespace {

[[noreturn]] void value_error(const std::string& msg) {
    throw nb::value_error(msg.c_str());
}

std::string repr(PyObject* o) {
    PyObject* r = PyObject_Repr(o);
    if (!r) {
        PyErr_Clear();
        return "<unrepresentable>";
    }
    const char* s = PyUnicode_AsUTF8(r);
    std::string out = s ? s : "<unrepresentable>";
    Py_DECREF(r);
    return out;
}

// An int (or an object with __index__, not a bool) in [lo, hi]; ok = false when it is not one.
int64_t as_int(PyObject* o, int64_t lo, int64_t hi, bool& ok) {
    ok = false;
    if (PyBool_Check(o)) return 0;
    PyObject* idx = nullptr;
    if (!PyLong_Check(o)) {
        if (!PyIndex_Check(o)) return 0;
        idx = PyNumber_Index(o);
        if (!idx) {
            PyErr_Clear();
            return 0;
        }
        o = idx;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    Py_XDECREF(idx);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (overflow || v < lo || v > hi) return 0;
    ok = true;
    return v;
}

// ``name`` (with ``field`` after ": " when given) names the value in the error.
std::string value_name(const char* name, const char* field) {
    return field ? std::string(name) + ": " + field : std::string(name);
}

int64_t check_int(const char* name, nb::handle h, int64_t lo, const char* field = nullptr) {
    bool ok;
    int64_t v = as_int(h.ptr(), lo, INT64_MAX, ok);
    if (!ok)
        value_error(value_name(name, field) + " must be an integer >= " + std::to_string(lo) + ", got " +
                    repr(h.ptr()));
    return v;
}

double check_real(const char* name, nb::handle h, const char* field = nullptr) {
    PyObject* o = h.ptr();
    double v = 0.0;
    bool ok = false;
    if (PyFloat_Check(o)) {
        v = PyFloat_AS_DOUBLE(o);
        ok = true;
    } else if (!PyBool_Check(o) && (PyLong_Check(o) || PyIndex_Check(o) ||
                                    PyObject_HasAttrString(o, "__float__"))) {
        v = PyFloat_AsDouble(o);
        if (v == -1.0 && PyErr_Occurred()) PyErr_Clear();
        else ok = true;
    }
    if (!ok || !std::isfinite(v))
        value_error(value_name(name, field) + " must be a finite number, got " + repr(o));
    return v;
}

// The speculation parameters every speculate call takes, checked (errors name ``where``).
struct SpecArgs {
    int64_t max_spec;
    double factor, offset, min_prob;
    bool tree;

    SpecArgs(const char* where, nb::handle max_spec_tokens, nb::handle max_spec_factor,
             nb::handle max_spec_offset, nb::handle min_token_prob, nb::handle use_tree_spec) {
        max_spec = check_int(where, max_spec_tokens, 0, "max_spec_tokens");
        factor = check_real(where, max_spec_factor, "max_spec_factor");
        offset = check_real(where, max_spec_offset, "max_spec_offset");
        min_prob = check_real(where, min_token_prob, "min_token_prob");
        const int t = PyObject_IsTrue(use_tree_spec.ptr());
        if (t < 0) throw nb::python_error();
        tree = t != 0;
    }
};

int64_t seq_id_of(const char* where, nb::handle h) {
    bool ok;
    int64_t v = as_int(h.ptr(), INT64_MIN, INT64_MAX, ok);
    if (!ok)
        value_error(std::string(where) + ": the native suffix tree takes int64 sequence ids, got " +
                    repr(h.ptr()));
    return v;
}

PyObject* checked(PyObject* o) {
    if (!o) throw nb::python_error();
    return o;
}

// The int32 token id o (else ValueError naming `where`).
inline int32_t token_of(const char* where, PyObject* o) {
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow || x < INT32_MIN || x > INT32_MAX)
            value_error(std::string(where) + ": token ids must fit in int32, got " + repr(o));
        return static_cast<int32_t>(x);
    }
    bool ok;
    const int64_t x = as_int(o, INT32_MIN, INT32_MAX, ok);
    if (!ok) value_error(std::string(where) + ": token ids must be int32 integers, got " + repr(o));
    return static_cast<int32_t>(x);
}

// A list or tuple as is (no copy), anything else iterable as a new list; items() / size().
class FastSeq {
  public:
    explicit FastSeq(PyObject* obj) {
        PyObject* fast = PySequence_Fast(obj, "token ids must be given as a sequence or iterable");
        if (!fast) throw nb::python_error();
        own_ = nb::steal(fast);
        n_ = PySequence_Fast_GET_SIZE(fast);
        items_ = PySequence_Fast_ITEMS(fast);
    }
    size_t size() const { return static_cast<size_t>(n_); }
    PyObject* operator[](size_t i) const { return items_[i]; }

  private:
    nb::object own_;
    Py_ssize_t n_ = 0;
    PyObject** items_ = nullptr;
};

// Token ids of the last keep_last items of obj (all when keep_last is 0) into out.
void read_tokens(const char* where, PyObject* obj, std::vector<int32_t>& out, size_t keep_last) {
    const FastSeq seq(obj);
    const size_t n = seq.size();
    const size_t first = (keep_last && n > keep_last) ? n - keep_last : 0;
    out.resize(n - first);
    for (size_t i = first; i < n; ++i) out[i - first] = token_of(where, seq[i]);
}

// score = sum(probs) exactly as this interpreter's builtin sum() adds floats (from int 0):
// left to right before 3.12, Neumaier-compensated from 3.12 on.
double py_sum(const double* p, size_t n) {
    if (n == 0) return 0.0;
#if PY_VERSION_HEX >= 0x030C0000
    double s = p[0], c = 0.0;
    for (size_t i = 1; i < n; ++i) {
        const double x = p[i];
        const double t = s + x;
        if (std::fabs(s) >= std::fabs(x)) c += (s - t) + x;
        else c += (x - t) + s;
        s = t;
    }
    if (c != 0.0 && std::isfinite(c)) s += c;
    return s;
#else
    double s = p[0];
    for (size_t i = 1; i < n; ++i) s += p[i];
    return s;
#endif
}

PyObject* int_tuple(const std::vector<int32_t>& v) {
    PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(v.size()));
    if (!t) throw nb::python_error();
    for (size_t i = 0; i < v.size(); ++i) {
        PyObject* x = PyLong_FromLong(v[i]);
        if (!x) {
            Py_DECREF(t);
            throw nb::python_error();
        }
        PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), x);
    }
    return t;
}

PyObject* int_list(const int32_t* v, size_t n) {
    PyObject* t = PyList_New(static_cast<Py_ssize_t>(n));
    if (!t) throw nb::python_error();
    for (size_t i = 0; i < n; ++i) {
        PyObject* x = PyLong_FromLong(v[i]);
        if (!x) {
            Py_DECREF(t);
            throw nb::python_error();
        }
        PyList_SET_ITEM(t, static_cast<Py_ssize_t>(i), x);
    }
    return t;
}

class PySuffixTree {
  public:
    explicit PySuffixTree(nb::handle max_depth)
        : tree_(check_int("SuffixTree: max_depth", max_depth, 1)) {}

    void extend(nb::handle seq_id, nb::handle tokens) {
        const int64_t sid = seq_id_of("SuffixTree.extend", seq_id);
        read_tokens("SuffixTree.extend", tokens.ptr(), buf_, 0);
        tree_.extend(sid, buf_.data(), buf_.size());
    }

    int64_t sync(nb::handle seq_id, nb::handle head, nb::handle tail, nb::handle check) {
        const char* where = "SuffixTree.sync";
        const int64_t sid = seq_id_of(where, seq_id);
        const int64_t chk = check_int("SuffixTree.sync: check", check, 0);
        const FastSeq h(head.ptr()), t(tail.ptr());
        const ajn::SuffixTree::SeqState* st = tree_.seq_state(sid);
        if (!st) return -1;
        const std::vector<int32_t>& stored = st->buf->toks;
        const size_t nh = h.size(), total = nh + t.size(), have = stored.size();
        if (have > total) return -1;
        const size_t lo = have > static_cast<size_t>(chk) ? have - static_cast<size_t>(chk) : 0;
        for (size_t i = lo; i < have; ++i)
            if (token_of(where, i < nh ? h[i] : t[i - nh]) != stored[i]) return -1;
        if (have == total) return 0;
        buf_.resize(total - have);
        for (size_t i = have; i < total; ++i) buf_[i - have] = token_of(where, i < nh ? h[i] : t[i - nh]);
        tree_.extend(sid, buf_.data(), buf_.size());
        return static_cast<int64_t>(total - have);
    }

    void remove(nb::handle seq_id) {
        bool ok;
        const int64_t sid = as_int(seq_id.ptr(), INT64_MIN, INT64_MAX, ok);
        if (!ok || !tree_.contains(sid))
            value_error("SuffixTree.remove: unknown sequence id " + repr(seq_id.ptr()));
        tree_.remove(sid);
    }

    nb::object speculate(nb::handle context, nb::handle max_spec_tokens, nb::handle max_spec_factor,
                         nb::handle max_spec_offset, nb::handle min_token_prob, nb::handle use_tree_spec) {
        const SpecArgs a("SuffixTree.speculate", max_spec_tokens, max_spec_factor, max_spec_offset,
                         min_token_prob, use_tree_spec);
        read_tokens("SuffixTree.speculate", context.ptr(), buf_, static_cast<size_t>(tree_.max_depth()));
        const ajn::Draft& d = tree_.speculate(buf_.data(), buf_.size(), a.max_spec, a.factor, a.offset,
                                              a.min_prob, a.tree, &py_sum);
        PyObject* out = PyTuple_New(5);
        if (!out) throw nb::python_error();
        nb::object guard = nb::steal(out);
        PyTuple_SET_ITEM(out, 0, int_tuple(d.token_ids));
        PyTuple_SET_ITEM(out, 1, int_tuple(d.parents));
        PyObject* probs = PyTuple_New(static_cast<Py_ssize_t>(d.probs.size()));
        if (!probs) throw nb::python_error();
        PyTuple_SET_ITEM(out, 2, probs);
        for (size_t i = 0; i < d.probs.size(); ++i) {
            PyObject* x = PyFloat_FromDouble(d.probs[i]);
            if (!x) throw nb::python_error();
            PyTuple_SET_ITEM(probs, static_cast<Py_ssize_t>(i), x);
        }
        PyObject* score = PyFloat_FromDouble(d.score);
        if (!score) throw nb::python_error();
        PyTuple_SET_ITEM(out, 3, score);
        PyObject* m = PyLong_FromLongLong(d.match_len);
        if (!m) throw nb::python_error();
        PyTuple_SET_ITEM(out, 4, m);
        return guard;
    }

    int64_t seq_len(nb::handle seq_id) const {
        bool ok;
        const int64_t sid = as_int(seq_id.ptr(), INT64_MIN, INT64_MAX, ok);
        const std::vector<int32_t>* s = ok ? tree_.sequence(sid) : nullptr;
        return s ? static_cast<int64_t>(s->size()) : 0;
    }

    nb::object seq_tail(nb::handle seq_id, nb::handle n) const {
        bool ok;
        const int64_t sid = as_int(seq_id.ptr(), INT64_MIN, INT64_MAX, ok);
        const std::vector<int32_t>* s = ok ? tree_.sequence(sid) : nullptr;
        bool n_ok;
        const int64_t want = as_int(n.ptr(), INT64_MIN, INT64_MAX, n_ok);
        if (!n_ok) value_error("SuffixTree.seq_tail: n must be an integer, got " + repr(n.ptr()));
        if (!s || want <= 0) return nb::steal(PyList_New(0));
        const size_t len = s->size();
        const size_t take = static_cast<uint64_t>(want) < len ? static_cast<size_t>(want) : len;
        return nb::steal(int_list(s->data() + (len - take), take));
    }

    nb::object sequence(nb::handle seq_id) const {
        bool ok;
        const int64_t sid = as_int(seq_id.ptr(), INT64_MIN, INT64_MAX, ok);
        const std::vector<int32_t>* s = ok ? tree_.sequence(sid) : nullptr;
        if (!s) throw nb::key_error(repr(seq_id.ptr()).c_str());
        return nb::steal(int_list(s->data(), s->size()));
    }

    nb::object seq_ids() const {
        const std::vector<int64_t> ids = tree_.seq_ids();
        nb::object out = nb::steal(checked(PyList_New(static_cast<Py_ssize_t>(ids.size()))));
        for (size_t i = 0; i < ids.size(); ++i)
            PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), checked(PyLong_FromLongLong(ids[i])));
        return out;
    }

    bool contains(nb::handle seq_id) const {
        bool ok;
        const int64_t sid = as_int(seq_id.ptr(), INT64_MIN, INT64_MAX, ok);
        return ok && tree_.contains(sid);
    }

    int64_t count(nb::handle path) {
        read_tokens("SuffixTree.count", path.ptr(), buf_, 0);
        return tree_.count(buf_.data(), buf_.size());
    }

    nb::object children(nb::handle path) {
        read_tokens("SuffixTree.children", path.ptr(), buf_, 0);
        auto kids = tree_.children(buf_.data(), buf_.size());
        nb::list out;
        for (auto& [tok, cnt] : kids) out.append(nb::make_tuple(tok, cnt));
        return out;
    }

    nb::object best_child(nb::handle path) {
        read_tokens("SuffixTree.best_child", path.ptr(), buf_, 0);
        auto kids = tree_.children(buf_.data(), buf_.size());
        if (kids.empty()) return nb::none();
        return nb::int_(kids[0].first);
    }

    const ajn::SuffixTree& tree() const { return tree_; }
    ajn::SuffixTree& tree() { return tree_; }

  private:
    ajn::SuffixTree tree_;
    std::vector<int32_t> buf_;
};

// Interned attribute names of a draft object (made once, at import).
PyObject* g_names[5];
PyObject* g_empty_tuple;

// cls.__new__-free construction, as object.__new__(cls) then object.__setattr__ of the five fields
// (works for frozen dataclasses such as arctic_jax.speculative.suffix_tree.Draft).
nb::object make_draft(PyObject* cls, const ajn::Draft* d, bool path) {
    nb::object obj = nb::steal(checked(PyBaseObject_Type.tp_new(reinterpret_cast<PyTypeObject*>(cls),
                                                                 g_empty_tuple, nullptr)));
    const size_t n = d ? d->token_ids.size() : 0;
    nb::object toks = nb::steal(checked(PyTuple_New(static_cast<Py_ssize_t>(n))));
    nb::object parents = nb::steal(checked(PyTuple_New(static_cast<Py_ssize_t>(n))));
    nb::object probs = nb::steal(checked(PyTuple_New(static_cast<Py_ssize_t>(n))));
    for (size_t i = 0; i < n; ++i) {
        const Py_ssize_t j = static_cast<Py_ssize_t>(i);
        PyTuple_SET_ITEM(toks.ptr(), j, checked(PyLong_FromLong(d->token_ids[i])));
        PyTuple_SET_ITEM(parents.ptr(), j,
                         checked(PyLong_FromLong(path ? static_cast<long>(i) - 1 : d->parents[i])));
        PyTuple_SET_ITEM(probs.ptr(), j, checked(PyFloat_FromDouble(d->probs[i])));
    }
    nb::object score = nb::steal(checked(PyFloat_FromDouble(d ? d->score : 0.0)));
    nb::object m = nb::steal(checked(PyLong_FromLongLong(d ? d->match_len : 0)));
    PyObject* vals[5] = {toks.ptr(), parents.ptr(), probs.ptr(), score.ptr(), m.ptr()};
    for (int i = 0; i < 5; ++i)
        if (PyObject_GenericSetAttr(obj.ptr(), g_names[i], vals[i]) < 0) throw nb::python_error();
    return obj;
}

nb::object speculate_pair(PySuffixTree& local, nb::handle local_seq, PySuffixTree* global,
                          nb::handle global_seq, nb::handle max_spec_tokens, nb::handle max_spec_factor,
                          nb::handle max_spec_offset, nb::handle min_token_prob, nb::handle use_tree_spec,
                          nb::handle draft_type) {
    const char* where = "speculate_pair";
    const SpecArgs a(where, max_spec_tokens, max_spec_factor, max_spec_offset, min_token_prob,
                     use_tree_spec);
    if (!PyType_Check(draft_type.ptr()))
        value_error("speculate_pair: draft_type must be a class, got " + repr(draft_type.ptr()));
    ajn::SuffixTree& lt = local.tree();
    const ajn::SuffixTree::SeqState* st = lt.seq_state(seq_id_of(where, local_seq));
    if (!st) value_error("speculate_pair: unknown local sequence id " + repr(local_seq.ptr()));
    if (global == &local) value_error("speculate_pair: the global tree must be another tree");
    if (global && global->tree().max_depth() != lt.max_depth())
        value_error("speculate_pair: both trees need the same max_depth");
    const std::vector<int32_t>& toks = st->buf->toks;
    const size_t n = std::min(toks.size(), static_cast<size_t>(lt.max_depth()));
    const int32_t* ctx = toks.data() + (toks.size() - n);
    const ajn::Draft* best = lt.speculate_above(ctx, n, st, a.max_spec, a.factor, a.offset, a.min_prob,
                                                a.tree, -1.0, &py_sum);
    if (global) {
        ajn::SuffixTree& gt = global->tree();
        const ajn::SuffixTree::SeqState* hint =
            global_seq.is_none() ? nullptr : gt.seq_state(seq_id_of(where, global_seq));
        const ajn::Draft* other = gt.speculate_above(ctx, n, hint, a.max_spec, a.factor, a.offset,
                                                     a.min_prob, a.tree, best ? best->score : 0.0, &py_sum);
        if (other) best = other;
    }
    return make_draft(draft_type.ptr(), best, !a.tree);
}

}  // namespace

NB_MODULE(_suffix_tree, m) {
    m.doc() = "Compiled suffix tree for arctic-jax suffix decoding (see arctic_jax_native).";
    const char* names[5] = {"token_ids", "parents", "probs", "score", "match_len"};
    for (int i = 0; i < 5; ++i) g_names[i] = checked(PyUnicode_InternFromString(names[i]));
    g_empty_tuple = checked(PyTuple_New(0));
    nb::class_<PySuffixTree>(m, "SuffixTree",
        "Depth-bounded, path-compressed suffix tree of int32 token sequences keyed by int64 ids;\n"
        "the drafts of arctic_jax.speculative.suffix_tree.SuffixTree. Not thread-safe.")
        .def(nb::init<nb::handle>(), nb::arg("max_depth").none())
        .def_prop_ro("max_depth", [](const PySuffixTree& t) { return t.tree().max_depth(); })
        .def_prop_ro("num_nodes", [](const PySuffixTree& t) { return t.tree().num_nodes(); },
                     "Nodes in the tree, root included (each holds a run of positions).")
        .def_prop_ro("num_tokens", [](const PySuffixTree& t) { return t.tree().num_tokens(); },
                     "Stored tokens over all sequences (= the root's count).")
        .def("__len__", [](const PySuffixTree& t) { return t.tree().num_seqs(); })
        .def("__contains__", &PySuffixTree::contains, nb::arg("seq_id").none())
        .def("extend", &PySuffixTree::extend, nb::arg("seq_id").none(), nb::arg("tokens").none(),
             "Append tokens to sequence seq_id (created when new), adding their suffixes.")
        .def("sync", &PySuffixTree::sync, nb::arg("seq_id").none(), nb::arg("head").none(),
             nb::arg("tail").none(), nb::arg("check").none(),
             "Bring seq_id up to head + tail when it is a prefix of it: when the stored length is\n"
             "<= len(head) + len(tail) and its last `check` stored tokens equal head + tail there,\n"
             "append the rest and return how many; else change nothing and return -1 (also when\n"
             "seq_id is absent).")
        .def("remove", &PySuffixTree::remove, nb::arg("seq_id").none(),
             "Remove sequence seq_id and all its suffix counts (ValueError when absent).")
        .def("speculate", &PySuffixTree::speculate, nb::arg("context").none(),
             nb::arg("max_spec_tokens").none(),
             nb::arg("max_spec_factor").none() = 1.0, nb::arg("max_spec_offset").none() = 0.0,
             nb::arg("min_token_prob").none() = 0.1, nb::arg("use_tree_spec").none() = false,
             "The best draft continuing context, as the tuple (token_ids, parents, probs, score,\n"
             "match_len) (the fields of suffix_tree.Draft, in order).")
        .def("seq_len", &PySuffixTree::seq_len, nb::arg("seq_id").none(),
             "Stored length of seq_id (0 when absent).")
        .def("seq_tail", &PySuffixTree::seq_tail, nb::arg("seq_id").none(), nb::arg("n").none(),
             "The last min(n, length) stored tokens of seq_id (a list).")
        .def("seq_ids", &PySuffixTree::seq_ids, "The stored sequence ids (a list, ascending).")
        .def("sequence", &PySuffixTree::sequence, nb::arg("seq_id").none(),
             "A copy of the stored tokens of seq_id (KeyError when absent).")
        .def("count", &PySuffixTree::count, nb::arg("path").none(),
             "Occurrences of the token string path (0 when absent or longer than max_depth).")
        .def("children", &PySuffixTree::children, nb::arg("path").none(),
             "(token, count) of path's children, best first (ties to the smaller token).")
        .def("best_child", &PySuffixTree::best_child, nb::arg("path").none(),
             "Token of path's best child (None when it has none).");
    m.def("speculate_pair", &speculate_pair, nb::arg("local_tree"), nb::arg("local_seq").none(),
          nb::arg("global_tree").none(), nb::arg("global_seq").none(), nb::arg("max_spec_tokens").none(),
          nb::arg("max_spec_factor").none(), nb::arg("max_spec_offset").none(),
          nb::arg("min_token_prob").none(), nb::arg("use_tree_spec").none(), nb::arg("draft_type").none(),
          "Suffix decoding's draft for one request, as draft_type (a class built as object.__new__\n"
          "then object.__setattr__ of token_ids, parents, probs (tuples), score (float), match_len\n"
          "(int); no match gives the empty draft). The context is the last max_depth tokens of\n"
          "local_seq in local_tree; the global tree's draft (None: no global tree) is taken only\n"
          "when it scores higher. global_seq is None or a sequence of the global tree that ends\n"
          "with the context (the request's response), used only to find matches faster.");
}
