// Depth-bounded, path-compressed suffix tree over int32 token sequences, and suffix-decoding
// speculation on it: a compiled twin of arctic_jax/speculative/suffix_tree.py (same definitions,
// same drafts). Sequences are keyed by int64 ids. Not thread-safe. No Python here (see bindings.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ajn {

// A stored token sequence. Append-only; shared by reference count between the tree's sequence table
// and the nodes whose runs point into it, so a removed sequence stays readable while nodes use it.
struct SeqBuf {
    std::vector<int32_t> toks;
    int64_t refs = 0;
};

struct Node;

// A node's children keyed by token: a compact array (linear search) while small, else an
// open-addressing hash table (linear probing, power-of-two capacity, load <= 1/2).
struct Kids {
    Node** ptr = nullptr;    // cap entries (null = empty slot in hash mode)
    int32_t* key = nullptr;  // cap tokens, in the same allocation as ptr
    uint32_t n = 0;          // children held
    uint32_t cap = 0;        // 0 = none; <= kSmall = compact; else hash table
    static constexpr uint32_t kSmall = 8;

    Node* find(int32_t tok) const;
    void insert(int32_t tok, Node* child);       // tok must be absent
    void replace(int32_t tok, Node* child);      // tok must be present
    void erase(int32_t tok);                     // tok must be present
    void release();
    bool hashed() const { return cap > kSmall; }
    uint32_t home(int32_t tok) const;
    template <class F> void for_each(F&& f) const {
        if (hashed()) {
            for (uint32_t i = 0; i < cap; ++i) if (ptr[i]) f(ptr[i]);
        } else {
            for (uint32_t i = 0; i < n; ++i) f(ptr[i]);
        }
    }
  private:
    void rebuild(uint32_t new_cap);
};

// A run of `length` tree positions with equal counts: tokens seq->toks[start, start + length).
// Children hang off the run's last position.
struct Node {
    int64_t count = 0;
    SeqBuf* seq = nullptr;
    Node* best = nullptr;   // cached best child; null = none or stale (rescanned on lookup)
    Kids kids;
    int32_t token = -1;
    int32_t start = 0;
    int32_t length = 0;
};

// The output of speculate: a token tree (parents[i] < i, -1 = follows the context).
struct Draft {
    std::vector<int32_t> token_ids;
    std::vector<int32_t> parents;
    std::vector<double> probs;
    double score = 0.0;
    int64_t match_len = 0;
    void clear() { token_ids.clear(); parents.clear(); probs.clear(); score = 0.0; match_len = 0; }
};

class SuffixTree {
  public:
    explicit SuffixTree(int64_t max_depth);   // throws std::invalid_argument when max_depth < 1
    ~SuffixTree();
    SuffixTree(const SuffixTree&) = delete;
    SuffixTree& operator=(const SuffixTree&) = delete;

    int64_t max_depth() const { return depth_; }
    int64_t num_nodes() const { return num_nodes_; }
    int64_t num_tokens() const { return root_->count; }
    size_t num_seqs() const { return seqs_.size(); }
    bool contains(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
    const std::vector<int32_t>* sequence(int64_t seq_id) const;   // null when absent

    // Append tokens to seq_id (created when new, also with no tokens), adding their suffixes.
    void extend(int64_t seq_id, const int32_t* toks, size_t n);
    // Remove seq_id and its suffix counts; throws std::invalid_argument when absent.
    void remove(int64_t seq_id);

    // count(path) (0 when absent) and path's children (token, count) in sibling order.
    int64_t count(const int32_t* path, size_t n) const;
    std::vector<std::pair<int32_t, int64_t>> children(const int32_t* path, size_t n) const;

    // A stored sequence: its tokens and the nodes where its last min(len, max_depth) suffixes end.
    struct SeqState {
        SeqBuf* buf;
        std::vector<Node*> active;   // ring of the suffixes still growing, oldest at `head`
        size_t head = 0;
    };
    const SeqState* seq_state(int64_t seq_id) const;   // null when absent
    std::vector<int64_t> seq_ids() const;               // the stored sequence ids, ascending

    // The best draft continuing ctx (its last max_depth tokens are used). sum_probs(p, n) must
    // return the score of a draft from its probs (the caller's summation rule).
    using SumFn = double (*)(const double*, size_t);
    const Draft& speculate(const int32_t* ctx, size_t n, int64_t max_spec, double factor,
                           double offset, double min_prob, bool tree, SumFn sum_probs);

    // speculate's best draft for ctx (n <= max_depth tokens) when its score beats `floor`
    // (-1.0: whenever some suffix of ctx matches), else null. `hint` is null or a sequence of this
    // tree that ends with ctx's last min(n, its length) tokens: its active suffixes give those
    // match positions without a walk from the root. Match lengths are visited by decreasing
    // score bound and skipped when the bound cannot beat the best so far (same result).
    const Draft* speculate_above(const int32_t* ctx, size_t n, const SeqState* hint, int64_t max_spec,
                                 double factor, double offset, double min_prob, bool tree,
                                 double floor, SumFn sum_probs);

  private:
    struct Cand {   // a tree-mode candidate: position (node, off + 1)
        double prob;
        uint64_t order;
        Node* node;
        int32_t off;
        int32_t parent;
    };

    Node* new_node(SeqBuf* seq, int32_t start, int32_t length, int64_t count);
    void free_subtree(Node* node);   // frees node and its descendants; updates num_nodes_
    Node* split(Node* parent, Node* child);
    static Node* best_child(Node* node);
    std::pair<Node*, int32_t> locate(const int32_t* path, size_t n) const;
    void draft_path(Node* node, int32_t off, int64_t budget, double min_prob, Draft& out);
    void draft_tree(Node* node, int32_t off, int64_t budget, double min_prob, Draft& out);
    void push_children(Node* node, int32_t off, double prob, int32_t parent, double min_prob);

    int64_t depth_;
    int64_t num_nodes_ = 1;
    Node* root_;
    std::unordered_map<int64_t, SeqState> seqs_;
    std::vector<Node*> free_nodes_;
    std::vector<Node*> node_blocks_;
    // speculate scratch (reused between calls)
    Draft best_, cur_;
    std::vector<Cand> heap_;
    std::vector<Node*> kids_scratch_;
    std::vector<std::pair<Node*, int32_t>> walked_;
    uint64_t order_ = 0;
    // budget table of speculate_above for (max_spec, factor, offset): per match length m < depth
    // the budget, its score cap min(budget, depth - m) (with room for rounding), and the m's by
    // decreasing cap, then decreasing m
    void budget_table(int64_t max_spec, double factor, double offset);
    bool table_ok_ = false;
    int64_t table_spec_ = 0;
    double table_factor_ = 0.0, table_offset_ = 0.0;
    std::vector<int64_t> budgets_;
    std::vector<double> caps_;
    std::vector<int32_t> order_m_;
};

}  // namespace ajn
