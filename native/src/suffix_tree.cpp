// Compiled twin of arctic_jax/speculative/suffix_tree.py; the definitions are in that module's
// docstring and in suffix_tree.h. Floating point follows the Python code operation by operation
// (build with -ffp-contract=off), so probs are bit-identical.
#include "suffix_tree.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace ajn {

namespace {

constexpr size_t kBlock = 1024;   // nodes per pool allocation

inline void ref(SeqBuf* s) {
    if (s) ++s->refs;
}

inline void unref(SeqBuf* s) {
    if (s && --s->refs == 0) delete s;
}

// Whether a comes before b among siblings: higher count, then smaller token id.
inline bool better(const Node* a, const Node* b) {
    return a->count > b->count || (a->count == b->count && a->token < b->token);
}

}  // namespace

// ---- Kids -------------------------------------------------------------------------------------
uint32_t Kids::home(int32_t tok) const {
    const uint32_t bits = static_cast<uint32_t>(__builtin_ctz(cap));
    const uint64_t h = static_cast<uint64_t>(static_cast<uint32_t>(tok)) * 0x9E3779B97F4A7C15ull;
    return static_cast<uint32_t>(h >> (64 - bits));
}

Node* Kids::find(int32_t tok) const {
    if (!hashed()) {
        for (uint32_t i = 0; i < n; ++i)
            if (key[i] == tok) return ptr[i];
        return nullptr;
    }
    const uint32_t mask = cap - 1;
    for (uint32_t i = home(tok);; i = (i + 1) & mask) {
        if (!ptr[i]) return nullptr;
        if (key[i] == tok) return ptr[i];
    }
}

void Kids::rebuild(uint32_t new_cap) {
    Node** old_ptr = ptr;
    int32_t* old_key = key;
    const uint32_t old_n = n, old_cap = cap;   // n/cap before the move
    const bool old_hashed = hashed();
    char* mem = static_cast<char*>(::operator new(new_cap * (sizeof(Node*) + sizeof(int32_t))));
    ptr = reinterpret_cast<Node**>(mem);
    key = reinterpret_cast<int32_t*>(mem + new_cap * sizeof(Node*));
    cap = new_cap;
    n = 0;
    if (hashed()) std::memset(ptr, 0, new_cap * sizeof(Node*));
    const uint32_t scan = old_hashed ? old_cap : old_n;
    for (uint32_t i = 0; i < scan; ++i)
        if (old_ptr[i]) insert(old_key[i], old_ptr[i]);
    ::operator delete(old_ptr);
}

void Kids::insert(int32_t tok, Node* child) {
    if (!hashed()) {
        if (n < cap) {
            key[n] = tok;
            ptr[n] = child;
            ++n;
            return;
        }
        rebuild(cap == 0 ? 2 : (cap < kSmall ? cap * 2 : 4 * kSmall));
        insert(tok, child);
        return;
    }
    if (2 * (n + 1) > cap) {
        rebuild(cap * 2);
        insert(tok, child);
        return;
    }
    const uint32_t mask = cap - 1;
    uint32_t i = home(tok);
    while (ptr[i]) i = (i + 1) & mask;
    key[i] = tok;
    ptr[i] = child;
    ++n;
}

void Kids::replace(int32_t tok, Node* child) {
    if (!hashed()) {
        for (uint32_t i = 0; i < n; ++i)
            if (key[i] == tok) { ptr[i] = child; return; }
    } else {
        const uint32_t mask = cap - 1;
        for (uint32_t i = home(tok); ptr[i]; i = (i + 1) & mask)
            if (key[i] == tok) { ptr[i] = child; return; }
    }
    throw std::logic_error("suffix tree: replace of a missing child (internal error)");
}

void Kids::erase(int32_t tok) {
    if (!hashed()) {
        for (uint32_t i = 0; i < n; ++i) {
            if (key[i] == tok) {
                --n;
                key[i] = key[n];
                ptr[i] = ptr[n];
                ptr[n] = nullptr;
                return;
            }
        }
        throw std::logic_error("suffix tree: erase of a missing child (internal error)");
    }
    const uint32_t mask = cap - 1;
    uint32_t i = home(tok);
    while (true) {
        if (!ptr[i]) throw std::logic_error("suffix tree: erase of a missing child (internal error)");
        if (key[i] == tok) break;
        i = (i + 1) & mask;
    }
    // backward-shift deletion keeps every probe chain unbroken
    uint32_t j = i;
    while (true) {
        j = (j + 1) & mask;
        if (!ptr[j]) break;
        const uint32_t k = home(key[j]);
        // move j into the hole at i unless j's home lies cyclically in (i, j]
        const bool stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            key[i] = key[j];
            ptr[i] = ptr[j];
            i = j;
        }
    }
    ptr[i] = nullptr;
    --n;
}

void Kids::release() {
    ::operator delete(ptr);
    ptr = nullptr;
    key = nullptr;
    n = cap = 0;
}

// ---- tree -------------------------------------------------------------------------------------
SuffixTree::SuffixTree(int64_t max_depth) : depth_(max_depth) {
    if (max_depth < 1)
        throw std::invalid_argument("SuffixTree: max_depth must be an integer >= 1, got " +
                                    std::to_string(max_depth));
    root_ = new_node(nullptr, 0, 0, 0);
    num_nodes_ = 1;
}

SuffixTree::~SuffixTree() {
    std::vector<Node*> stack{root_};
    while (!stack.empty()) {
        Node* node = stack.back();
        stack.pop_back();
        node->kids.for_each([&](Node* c) { stack.push_back(c); });
        node->kids.release();
        unref(node->seq);
    }
    for (auto& kv : seqs_) unref(kv.second.buf);
    for (Node* block : node_blocks_) delete[] block;
}

Node* SuffixTree::new_node(SeqBuf* seq, int32_t start, int32_t length, int64_t count) {
    if (free_nodes_.empty()) {
        Node* block = new Node[kBlock];
        node_blocks_.push_back(block);
        free_nodes_.reserve(free_nodes_.size() + kBlock);
        for (size_t i = kBlock; i-- > 0;) free_nodes_.push_back(block + i);
    }
    Node* node = free_nodes_.back();
    free_nodes_.pop_back();
    node->count = count;
    node->seq = seq;
    ref(seq);
    node->best = nullptr;
    node->kids = Kids();
    node->token = length ? seq->toks[start] : -1;
    node->start = start;
    node->length = length;
    return node;
}

void SuffixTree::free_subtree(Node* top) {
    kids_scratch_.clear();
    kids_scratch_.push_back(top);
    while (!kids_scratch_.empty()) {
        Node* node = kids_scratch_.back();
        kids_scratch_.pop_back();
        node->kids.for_each([&](Node* c) { kids_scratch_.push_back(c); });
        node->kids.release();
        unref(node->seq);
        node->seq = nullptr;
        free_nodes_.push_back(node);
        --num_nodes_;
    }
}

const std::vector<int32_t>* SuffixTree::sequence(int64_t seq_id) const {
    auto it = seqs_.find(seq_id);
    return it == seqs_.end() ? nullptr : &it->second.buf->toks;
}

void SuffixTree::extend(int64_t seq_id, const int32_t* toks, size_t n) {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) {
        SeqBuf* buf = new SeqBuf();
        ref(buf);
        it = seqs_.emplace(seq_id, SeqState{buf, {}, 0}).first;
    }
    SeqState& st = it->second;
    SeqBuf* buf = st.buf;
    std::vector<Node*>& active = st.active;
    Node* const root = root_;
    const size_t depth = static_cast<size_t>(depth_);
    buf->toks.reserve(buf->toks.size() + n);
    for (size_t t = 0; t < n; ++t) {
        const int32_t tok = toks[t];
        const int32_t pos = static_cast<int32_t>(buf->toks.size());
        buf->toks.push_back(tok);
        // a new suffix starts at the root; at max_depth active ones the oldest is done (replaced)
        if (active.size() < depth) {
            active.push_back(root);
        } else {
            active[st.head] = root;
            st.head = st.head + 1 == depth ? 0 : st.head + 1;
        }
        const size_t na = active.size();
        for (size_t k = 0; k < na; ++k) {   // oldest first
            size_t idx = st.head + k;
            if (idx >= na) idx -= na;
            Node* node = active[idx];
            if (node->count == 1 && node != root) {
                // only this suffix reaches node, a leaf: lengthen its run in place
                if (node->seq != buf || node->start + node->length != pos) {
                    ref(buf);
                    unref(node->seq);
                    node->seq = buf;
                    node->start = pos - node->length;
                }
                ++node->length;
                continue;
            }
            Node* child = node->kids.find(tok);
            if (!child) {
                child = new_node(buf, pos, 1, 0);
                node->kids.insert(tok, child);
                ++num_nodes_;
            } else if (child->length > 1) {
                child = split(node, child);
            }
            ++child->count;
            Node* best = node->best;
            if (best != nullptr && best != child && better(child, best))
                node->best = child;
            else if (best == nullptr && node->kids.n == 1)
                node->best = child;
            active[idx] = child;
        }
        ++root->count;
    }
}

Node* SuffixTree::split(Node* parent, Node* child) {
    // cut child's first position into a new node between parent and child (child keeps its
    // identity, so active suffixes ending at its last position stay valid)
    Node* head = new_node(child->seq, child->start, 1, child->count);
    ++num_nodes_;
    child->start += 1;
    child->length -= 1;
    child->token = child->seq->toks[child->start];
    head->kids.insert(child->token, child);
    head->best = child;
    parent->kids.replace(head->token, head);
    if (parent->best == child) parent->best = head;
    return head;
}

void SuffixTree::remove(int64_t seq_id) {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end())
        throw std::invalid_argument("SuffixTree.remove: unknown sequence id " + std::to_string(seq_id));
    SeqBuf* buf = it->second.buf;
    seqs_.erase(it);
    const std::vector<int32_t>& seq = buf->toks;
    const size_t len = seq.size();
    const size_t depth = static_cast<size_t>(depth_);
    for (size_t start = 0; start < len; ++start) {
        const size_t end = std::min(start + depth, len);
        Node* node = root_;
        size_t i = start;
        while (i < end) {   // the suffix's runs: it ends at a run's last position
            Node* child = node->kids.find(seq[i]);
            if (!child) throw std::logic_error("SuffixTree.remove: missing suffix (internal error)");
            --child->count;
            if (node->best == child) node->best = nullptr;   // stale: rescanned on the next lookup
            if (child->count == 0) {
                // every position below has count 0 too: drop the whole branch
                node->kids.erase(seq[i]);
                free_subtree(child);
                break;
            }
            i += static_cast<size_t>(child->length);
            node = child;
        }
    }
    root_->count -= static_cast<int64_t>(len);
    unref(buf);
}

Node* SuffixTree::best_child(Node* node) {
    Node* best = node->best;
    if (best == nullptr && node->kids.n) {
        node->kids.for_each([&](Node* c) {
            if (best == nullptr || better(c, best)) best = c;
        });
        node->best = best;
    }
    return best;
}

std::pair<Node*, int32_t> SuffixTree::locate(const int32_t* path, size_t n) const {
    Node* node = root_;
    int32_t off = 0;
    for (size_t i = 0; i < n; ++i) {
        const int32_t t = path[i];
        if (off < node->length) {
            if (node->seq->toks[node->start + off] != t) return {nullptr, -1};
            ++off;
        } else {
            node = node->kids.find(t);
            if (!node) return {nullptr, -1};
            off = 1;
        }
    }
    return {node, off};
}

int64_t SuffixTree::count(const int32_t* path, size_t n) const {
    Node* node = locate(path, n).first;
    return node ? node->count : 0;
}

std::vector<std::pair<int32_t, int64_t>> SuffixTree::children(const int32_t* path, size_t n) const {
    std::vector<std::pair<int32_t, int64_t>> out;
    auto [node, off] = locate(path, n);
    if (!node) return out;
    if (off < node->length) {
        out.emplace_back(node->seq->toks[node->start + off], node->count);
        return out;
    }
    node->kids.for_each([&](Node* c) { out.emplace_back(c->token, c->count); });
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
        return a.second > b.second || (a.second == b.second && a.first < b.first);
    });
    return out;
}

// ---- speculation ------------------------------------------------------------------------------
namespace {
constexpr double kSlack = 1.0 + 1e-9;   // room for rounding in the score bounds
}  // namespace

const SuffixTree::SeqState* SuffixTree::seq_state(int64_t seq_id) const {
    auto it = seqs_.find(seq_id);
    return it == seqs_.end() ? nullptr : &it->second;
}

std::vector<int64_t> SuffixTree::seq_ids() const {
    std::vector<int64_t> out;
    out.reserve(seqs_.size());
    for (const auto& kv : seqs_) out.push_back(kv.first);
    std::sort(out.begin(), out.end());
    return out;
}

void SuffixTree::budget_table(int64_t max_spec, double factor, double offset) {
    if (table_ok_ && table_spec_ == max_spec && table_factor_ == factor && table_offset_ == offset) return;
    const int64_t depth = depth_;
    budgets_.assign(static_cast<size_t>(depth), 0);
    caps_.assign(static_cast<size_t>(depth), 0.0);
    order_m_.clear();
    for (int64_t m = 0; m < depth; ++m) {
        // budget = max(0, min(max_spec, floor(m * factor + offset + 1e-6)))
        const double raw = std::floor(static_cast<double>(m) * factor + offset + 1e-6);
        int64_t budget;
        if (!(raw > 0.0)) budget = 0;
        else if (raw >= static_cast<double>(max_spec)) budget = max_spec;
        else budget = static_cast<int64_t>(raw);
        budgets_[static_cast<size_t>(m)] = budget;
        caps_[static_cast<size_t>(m)] = static_cast<double>(std::min(budget, depth - m)) * kSlack;
        if (m >= 1) order_m_.push_back(static_cast<int32_t>(m));
    }
    const std::vector<double>& caps = caps_;
    std::sort(order_m_.begin(), order_m_.end(), [&caps](int32_t a, int32_t b) {
        return caps[static_cast<size_t>(a)] > caps[static_cast<size_t>(b)] ||
               (caps[static_cast<size_t>(a)] == caps[static_cast<size_t>(b)] && a > b);
    });
    table_ok_ = true;
    table_spec_ = max_spec;
    table_factor_ = factor;
    table_offset_ = offset;
}

const Draft& SuffixTree::speculate(const int32_t* ctx, size_t n, int64_t max_spec, double factor,
                                   double offset, double min_prob, bool tree, SumFn sum_probs) {
    const size_t depth = static_cast<size_t>(depth_);
    if (n > depth) {
        ctx += n - depth;
        n = depth;
    }
    if (!speculate_above(ctx, n, nullptr, max_spec, factor, offset, min_prob, tree, -1.0, sum_probs))
        best_.clear();
    return best_;
}

const Draft* SuffixTree::speculate_above(const int32_t* ctx, size_t n, const SeqState* hint,
                                         int64_t max_spec, double factor, double offset,
                                         double min_prob, bool tree, double floor, SumFn sum_probs) {
    if (n < 2) return nullptr;
    const size_t na = hint ? hint->active.size() : 0;
    const size_t known = std::min(na, n - 1);   // m <= known: ctx's last m tokens end at an active node
    size_t longest = known;
    walked_.clear();
    while (longest < n - 1) {   // longer matches: walk from the root
        auto found = locate(ctx + (n - longest - 1), longest + 1);
        if (!found.first) break;
        walked_.push_back(found);
        ++longest;
    }
    if (longest == 0) return nullptr;
    budget_table(max_spec, factor, offset);
    const double depth = static_cast<double>(depth_);
    // the best is the highest (score, m): a floor is beaten by a higher score only
    double best_score = floor;
    size_t best_m = n;
    bool found = false;
    for (const int32_t mi : order_m_) {
        const size_t m = static_cast<size_t>(mi);
        const double cap = caps_[m];
        if (cap < best_score) break;   // caps only decrease from here
        if (m > longest || (cap <= best_score && m < best_m)) continue;
        Node* node;
        int32_t off;
        if (m <= known) {
            size_t idx = hint->head + na - m;
            if (idx >= na) idx -= na;
            node = hint->active[idx];
            off = node->length;
        } else {
            node = walked_[m - known - 1].first;
            off = walked_[m - known - 1].second;
        }
        const int64_t budget = budgets_[m];
        if (off == node->length) {
            // every prob is <= the first step's, and a level's probs sum to <= the children's share
            // of the count: tighter bounds
            Node* child = best_child(node);
            const double total = static_cast<double>(node->count);
            const double p1 = child ? static_cast<double>(child->count) / total : 0.0;
            const double room = depth - static_cast<double>(m);
            double bound = tree ? std::min(static_cast<double>(budget) * p1, room) * kSlack : cap * p1;
            if (bound < best_score || (bound <= best_score && m < best_m)) continue;
            if (tree && node->kids.n > 0 && !node->kids.hashed()) {
                int64_t sum = 0;
                node->kids.for_each([&](Node* c) { sum += c->count; });
                const double share = static_cast<double>(sum) / total;
                bound = std::min(bound, room * share * kSlack);
                if (bound < best_score || (bound <= best_score && m < best_m)) continue;
            }
        }
        cur_.clear();
        if (tree) draft_tree(node, off, budget, min_prob, cur_);
        else draft_path(node, off, budget, min_prob, cur_);
        const double score = sum_probs(cur_.probs.data(), cur_.probs.size());
        if (score > best_score || (score == best_score && m > best_m)) {
            cur_.score = score;
            cur_.match_len = static_cast<int64_t>(m);
            std::swap(cur_, best_);
            best_score = score;
            best_m = m;
            found = true;
        }
    }
    return found ? &best_ : nullptr;
}

void SuffixTree::draft_path(Node* node, int32_t off, int64_t budget, double min_prob, Draft& out) {
    double prob = 1.0;
    int64_t emitted = 0;
    while (emitted < budget) {
        int32_t tok;
        if (off < node->length) {   // inside a run: the one child has the same count
            tok = node->seq->toks[node->start + off];
            ++off;
        } else {
            Node* child = best_child(node);
            if (!child) break;
            prob = prob * (static_cast<double>(child->count) / static_cast<double>(node->count));
            node = child;
            off = 1;
            tok = child->token;
        }
        if (prob < min_prob) break;
        out.token_ids.push_back(tok);
        out.parents.push_back(static_cast<int32_t>(emitted) - 1);
        out.probs.push_back(prob);
        ++emitted;
    }
}

namespace {
// heap order: higher prob first, then earlier push
struct CandLess {
    template <class C> bool operator()(const C& a, const C& b) const {
        return a.prob < b.prob || (a.prob == b.prob && a.order > b.order);
    }
};
}  // namespace

void SuffixTree::push_children(Node* node, int32_t off, double prob, int32_t parent, double min_prob) {
    if (off < node->length) {
        if (prob >= min_prob) {
            heap_.push_back(Cand{prob, order_++, node, off, parent});
            std::push_heap(heap_.begin(), heap_.end(), CandLess());
        }
        return;
    }
    // the children whose prob passes, in sibling order (prob is monotone in count, so this is the
    // same set as scanning the ordered children up to the first one below min_prob)
    kids_scratch_.clear();
    const double total = static_cast<double>(node->count);
    node->kids.for_each([&](Node* c) {
        if (prob * (static_cast<double>(c->count) / total) >= min_prob) kids_scratch_.push_back(c);
    });
    if (kids_scratch_.size() > 1)
        std::sort(kids_scratch_.begin(), kids_scratch_.end(),
                  [](const Node* a, const Node* b) { return better(a, b); });
    for (Node* c : kids_scratch_) {
        const double p = prob * (static_cast<double>(c->count) / total);
        heap_.push_back(Cand{p, order_++, c, 0, parent});
        std::push_heap(heap_.begin(), heap_.end(), CandLess());
    }
}

void SuffixTree::draft_tree(Node* node, int32_t off, int64_t budget, double min_prob, Draft& out) {
    heap_.clear();
    order_ = 0;
    if (budget > 0) push_children(node, off, 1.0, -1, min_prob);
    int64_t emitted = 0;
    while (!heap_.empty() && emitted < budget) {
        std::pop_heap(heap_.begin(), heap_.end(), CandLess());
        const Cand c = heap_.back();
        heap_.pop_back();
        out.token_ids.push_back(c.node->seq->toks[c.node->start + c.off]);
        out.parents.push_back(c.parent);
        out.probs.push_back(c.prob);
        ++emitted;
        if (emitted < budget)
            push_children(c.node, c.off + 1, c.prob, static_cast<int32_t>(emitted - 1), min_prob);
    }
}

}  // namespace ajn
