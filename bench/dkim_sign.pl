#!/usr/bin/perl
# dkim_sign.pl: sign a message with Perl's Mail::DKIM, the reference signer of the filter
# benchmark's signed workload (bench/filter_bench.py --workload signed) and of bench/dkim_cost.py.
#
#   dkim_sign.pl --key FILE --domain D --selector S [--in FILE] [--out FILE]
#       Reads the message (LF or CRLF line ends), signs it with rsa-sha256 and relaxed/relaxed,
#       and writes it with the DKIM-Signature field on top, every line ending in CRLF.
#   dkim_sign.pl --key FILE --domain D --selector S [--in FILE] --time N [--repeat R]
#       Signs the message N times, R rounds (default 5), the key loaded once, and prints one
#       line of JSON: {"us_per_msg": median over the rounds, "rounds": [...], "n": N,
#       "mail_dkim": version}. Each signing builds a Signer, feeds it the message line by line
#       and formats the signature, as a mail program signing one message at a time would.
#
# Mail::DKIM signs the header fields of its default list that the message has (From, To,
# Subject, Date, Message-ID, MIME-Version, Content-Type, ...). Debian 12's Mail::DKIM
# (1.20230212) has no Ed25519 signer; --algorithm takes what the installed version knows.
# Exit status: 0, or 2 with a message on standard error.
use strict;
use warnings;
use Getopt::Long;
use Mail::DKIM;
use Mail::DKIM::PrivateKey;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;    # the signer folds the signature field when this is loaded
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my %opt = (algorithm => 'rsa-sha256', method => 'relaxed', repeat => 5, time => 0);
GetOptions(\%opt, 'key=s', 'domain=s', 'selector=s', 'algorithm=s', 'method=s', 'in=s', 'out=s',
           'time=i', 'repeat=i')
  && $opt{key} && $opt{domain} && $opt{selector} && $opt{time} >= 0 && $opt{repeat} >= 1
  or usage();

sub usage {
    print STDERR "usage: dkim_sign.pl --key FILE --domain D --selector S [--algorithm A]"
      . " [--method relaxed|simple|relaxed/simple...] [--in FILE] [--out FILE]"
      . " [--time N [--repeat R]]\n";
    exit 2;
}

sub fail {
    print STDERR "dkim_sign.pl: @_\n";
    exit 2;
}

# The message as CRLF lines.
my $in;
if (defined $opt{in}) {
    open $in, '<', $opt{in} or fail("cannot read $opt{in}: $!");
}
else {
    $in = \*STDIN;
}
binmode $in;
my @lines;
while (my $line = <$in>) {
    $line =~ s/\r?\n\z//;
    push @lines, "$line\r\n";
}
close $in if defined $opt{in};
@lines or fail('the message is empty');

my $key = eval { Mail::DKIM::PrivateKey->load(File => $opt{key}) };
$key or fail("cannot load the key $opt{key}: " . ($@ || 'no key'));
$key->cork or fail("$opt{key} holds no RSA private key: " . ($key->errorstr || 'unreadable'));

sub signature_of {
    my $signer = Mail::DKIM::Signer->new(
        Algorithm => $opt{algorithm},
        Method    => $opt{method},
        Domain    => $opt{domain},
        Selector  => $opt{selector},
        Key       => $key,
    );
    $signer->PRINT($_) for @lines;
    $signer->CLOSE;
    my $signature = $signer->signature or fail('Mail::DKIM made no signature: ' . ($signer->result_detail || '?'));
    return $signature;
}

if ($opt{time}) {
    my @rounds;
    for (1 .. $opt{repeat}) {
        my $start = clock_gettime(CLOCK_MONOTONIC);
        for (1 .. $opt{time}) {
            my $text = signature_of()->as_string;
        }
        push @rounds, (clock_gettime(CLOCK_MONOTONIC) - $start) * 1e6 / $opt{time};
    }
    my @sorted = sort { $a <=> $b } @rounds;
    my $mid = @sorted % 2 ? $sorted[$#sorted / 2] : ($sorted[@sorted / 2 - 1] + $sorted[@sorted / 2]) / 2;
    printf "{\"us_per_msg\": %.2f, \"rounds\": [%s], \"n\": %d, \"mail_dkim\": \"%s\"}\n",
      $mid, join(', ', map { sprintf '%.2f', $_ } @rounds), $opt{time}, $Mail::DKIM::VERSION;
    exit 0;
}

# The signer folded the field itself (Mail::DKIM::TextWrap is loaded): before hashing the
# tags, after signing b=. Folding it again here would break the signature.
my $field = signature_of()->as_string;
$field =~ s/\r?\n/\r\n/g;     # every line of the field ends in CRLF
my $out;
if (defined $opt{out}) {
    open $out, '>', $opt{out} or fail("cannot write $opt{out}: $!");
}
else {
    $out = \*STDOUT;
}
binmode $out;
print $out $field, "\r\n", @lines;
close $out or fail("cannot write $opt{out}: $!") if defined $opt{out};
exit 0;
